"""Tokenize a text source into token shards: `python launch/prepare_data.py --config configs/X.yaml`
(uses the config's data section), or name everything: `--source roneneldan/TinyStories
--tokenizer tokenizers/tinystories-10k --out data/tinystories`.
`--verify DIR` reads every shard of DIR in full against the checksums in its manifest.json instead (training
checks each block the first time it reads it)."""

import argparse

from dist_lm.cli import run_main
from dist_lm.config import load_config
from dist_lm.data import prepare_shards, verify_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="training YAML whose data section to use")
    parser.add_argument("--source", help="bundled:tinystories, a .txt/.jsonl/.parquet file, or a hub dataset name")
    parser.add_argument("--tokenizer", help="tokenizer directory")
    parser.add_argument("--out", help="output shard directory")
    parser.add_argument("--text-field", help="text column of jsonl/parquet/hub sources")
    parser.add_argument("--val-fraction", type=float, help="documents held out when the source has no val split")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    parser.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest, then exit")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.data_dir=data/x")
    args = parser.parse_args()
    if args.verify:
        found = verify_shards(args.verify)
        print(f"{args.verify}: {found['shards']} shards, {found['bytes']:,} bytes: every checksum matches")
        return
    d = load_config(args.config, args.overrides).data
    source = args.source or d.source
    out = args.out or d.data_dir
    print(f"tokenizing {source} -> {out}")
    manifest = prepare_shards(
        source, args.tokenizer or d.tokenizer_dir, out,
        text_field=args.text_field or d.text_field,
        val_fraction=d.val_fraction if args.val_fraction is None else args.val_fraction,
        shard_tokens=args.shard_tokens, num_workers=args.workers, overwrite=args.overwrite,
    )
    print(f"wrote {out}/manifest.json ({manifest['dtype']}, {manifest['seconds']} s)")


if __name__ == "__main__":
    run_main(main)
