#!/usr/bin/env bash
# A real SLURM cluster on this one host, for tests/slurm: munged, slurmctld and two slurmd "nodes" (n1, n2).
#
#   tools/slurm_cluster.sh start    install the Debian packages if missing (root), start the daemons, wait until
#                                   both nodes are idle; a no-op when it already runs
#   tools/slurm_cluster.sh stop     cancel its jobs, stop the daemons by their pid files; a no-op when stopped
#   tools/slurm_cluster.sh status   exit 0 if it runs, 1 if not
#   tools/slurm_cluster.sh env      print `export SLURM_CONF=...`: eval "$(tools/slurm_cluster.sh env)"
#
# Design (measured on a 2-core Debian 12 VM without systemd: ../shared/notes/slurm-local-cluster.md):
# - Everything lives under one directory, $DIST_LM_SLURM_DIR (default /tmp/dist_lm_slurm): slurm.conf, state,
#   spool, logs, pid files and the munge socket. /etc/slurm is never written: SLURM's commands and daemons read
#   SLURM_CONF, and our munged listens on its own socket (AuthInfo=socket=...), beside any system one.
# - Plain daemons, no systemd and no cgroups: proctrack/linuxproc, task/none. SlurmUser=root, so the directories
#   need no chown to the slurm user.
# - Two slurmd on one host (slurmd -N n1 / -N n2, own port, spool, pid and log each) share this machine's CPUs;
#   each gets half its memory so that the two do not promise more than there is.
# - Every start is a clean start: state and spool are wiped, so job ids restart at 1 and no stale job is
#   recovered onto the nodes.
# - The only files written outside the directory: one line in /etc/hosts (`127.0.0.1 n1 n2`, tagged, removed
#   again by stop) so that node names from `scontrol show hostnames` resolve for multi-node launches; and the
#   packages, which stop leaves installed.
set -euo pipefail

# The daemons live in sbin, which a non-login root shell may not have on its PATH.
export PATH=$PATH:/usr/sbin:/sbin
DIR=$(realpath -m "${DIST_LM_SLURM_DIR:-/tmp/dist_lm_slurm}")
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
HOSTS_LINE="127.0.0.1 n1 n2  # added by dist_lm tools/slurm_cluster.sh"
HOSTS_MARK=$DIR/hosts-line-added
NODES=(n1 n2)
# Off SLURM's default ports (6817/6818), so a system SLURM on this host does not collide with this one.
CTLD_PORT=16817
declare -A NODE_PORT=([n1]=16818 [n2]=16819)
PACKAGES=(slurmctld slurmd slurm-client munge)
START_TIMEOUT_S=60
STOP_TIMEOUT_S=30
export SLURM_CONF=$CONF

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
say() { echo "slurm_cluster.sh: $*"; }

# name:pidfile:expected comm, for every daemon, in the order stop kills them (munged last: the others talk to it).
daemons() {
    local n
    for n in "${NODES[@]}"; do echo "slurmd $n:$DIR/run/slurmd.$n.pid:slurmd"; done
    echo "slurmctld:$DIR/run/slurmctld.pid:slurmctld"
    echo "munged:$MUNGE_DIR/munged.pid:munged"
}

# The pid in a pid file, if that process is alive and is the daemon (a reused pid is not ours).
live_pid() {
    local pidfile=$1 comm=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

# Prints "running", "stopped" or "partly running (...)".
state() {
    local name pidfile comm up=() down=()
    while IFS=: read -r name pidfile comm; do
        if live_pid "$pidfile" "$comm" >/dev/null; then up+=("$name"); else down+=("$name"); fi
    done < <(daemons)
    if ((${#down[@]} == 0)); then echo running
    elif ((${#up[@]} == 0)); then echo stopped
    else echo "partly running (up: ${up[*]}; down: ${down[*]})"
    fi
}

log_tails() {
    local f
    for f in "$DIR"/log/slurm*.log "$MUNGE_DIR"/*.log; do
        [[ -s $f ]] && { echo "--- tail of $f"; tail -n 15 "$f"; }
    done >&2
    return 0  # not the status of the last [[ -s ]]: under set -e that would end the caller before its message
}

install_packages() {
    local missing=() t0 log=$DIR/log/apt.log
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    ((EUID == 0)) || die "SLURM is not installed (missing: ${missing[*]}) and only root can install it: run as root, or: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "SLURM is not installed (missing: ${missing[*]}) and there is no apt-get to install it"
    say "installing ${PACKAGES[*]} (log: $log)"
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists, or stale ones whose files 404: update, then install once more.
    {
        { apt-cache show slurmctld >/dev/null 2>&1 || apt-get update; } &&
            { apt-get install -y --no-install-recommends "${PACKAGES[@]}" ||
                { apt-get update && apt-get install -y --no-install-recommends "${PACKAGES[@]}"; }; }
    } >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "could not install ${PACKAGES[*]} with apt-get (full log: $log)"; }
    say "installed in $((SECONDS - t0)) s"
}

start_munged() {
    # systemd would create /run/munge (RuntimeDirectory); here munged's socket, pid, log and seed live in our
    # directory instead, owned by munge, which munged checks before it starts.
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
        { log_tails; die "munged did not start (log: $MUNGE_DIR/munged.log)"; }
    munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null ||
        { log_tails; die "munged runs but a credential does not round-trip through $MUNGE_SOCKET"; }
}

write_conf() {
    # `slurmd -C` prints this machine as a node line: CPUs=.. Boards=.. ... RealMemory=.. (MB).
    local hw cpus topo mem
    hw=$(env -u SLURM_CONF slurmd -C | head -n 1)
    cpus=$(grep -o 'CPUs=[0-9]*' <<<"$hw") || die "slurmd -C printed no CPUs=: $hw"
    topo=$(grep -oE '(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$hw" | tr '\n' ' ')
    mem=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2) || die "slurmd -C printed no RealMemory=: $hw"
    cat >"$CONF" <<EOF
# Written by tools/slurm_cluster.sh for a 2-node cluster emulated on this host; rewritten by every start.
ClusterName=dist_lm
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s; minimum 5).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# A job that can never run is refused at submission instead of pending forever.
EnforcePartLimits=ALL
# Job scripts requeue themselves (scontrol requeue, --requeue) and get 30 s between SIGTERM and SIGKILL.
JobRequeue=1
KillWait=30
# The scheduler's periodic passes (default every 60 s, backfill every 30 s) start a requeued job once its begin
# time passes: at this size they cost nothing, so make them frequent.
SchedulerParameters=sched_interval=2,bf_interval=1
# "sbatch --wait" polls on a back-off of 2, 8, 32 s, capped at 32 s but kept below MinJobAge/2 so that a job is
# not purged before sbatch sees it end. The default (300 s) lets a 12 s job return after 42 s; 16 keeps every poll
# at most 8 s apart, and a finished job stays in "scontrol show job" for at least 16 s.
MinJobAge=16
# No mail here: without this slurmctld logs "Configured MailProg is invalid" at every start.
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmdLogFile=$DIR/log/slurmd.%n.log
NodeName=n1 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=${NODE_PORT[n1]} $cpus ${topo}RealMemory=$((mem / 2)) State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=${NODE_PORT[n2]} $cpus ${topo}RealMemory=$((mem / 2)) State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

add_hosts_line() {
    grep -qxF "$HOSTS_LINE" /etc/hosts && return 0
    # Append without replacing the file: /etc/hosts is often a bind mount, which a rename (sed -i) cannot replace.
    echo "$HOSTS_LINE" >>/etc/hosts
    touch "$HOSTS_MARK"
}

remove_hosts_line() {
    [[ -e $HOSTS_MARK ]] || return 0
    local kept
    kept=$(grep -vxF "$HOSTS_LINE" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
    rm -f "$HOSTS_MARK"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        [[ $states == "n1 idle n2 idle " ]] && return 0
        sleep 0.5
    done
    log_tails
    die "the nodes were not idle ${START_TIMEOUT_S} s after start (sinfo: '${states:-no answer}')"
}

# A start that fails half-way leaves nothing running and /etc/hosts as it was; the logs stay.
undo_failed_start() {
    local rc=$?
    ((rc == 0)) && return
    stop_daemons >/dev/null 2>&1 || true
    remove_hosts_line || true
    echo "slurm_cluster.sh: start failed; stopped what it had started (logs: $DIR/log, $MUNGE_DIR)" >&2
    exit "$rc"
}

start() {
    local s t0=$SECONDS n
    s=$(state)
    if [[ $s == running ]]; then say "already running (SLURM_CONF=$CONF)"; return 0; fi
    ((EUID == 0)) || die "starting the cluster needs root (the daemons run as root and munged as munge); it is $s"
    [[ $s == stopped ]] || { say "$s: stopping the rest first"; stop_daemons; }
    trap undo_failed_start EXIT
    mkdir -p "$DIR"/{log,run}
    install_packages
    rm -rf "$DIR/state" "$DIR/spool" "$DIR"/log/slurm*.log "$MUNGE_DIR"/munged.log
    mkdir -p "$DIR/state" "${NODES[@]/#/$DIR/spool/}"
    start_munged
    write_conf
    add_hosts_line
    slurmctld || { log_tails; die "slurmctld did not start (log: $DIR/log/slurmctld.log)"; }
    for n in "${NODES[@]}"; do
        slurmd -N "$n" || { log_tails; die "slurmd -N $n did not start (log: $DIR/log/slurmd.$n.log)"; }
    done
    wait_idle
    trap - EXIT
    say "running in $((SECONDS - t0)) s: nodes n1 n2 idle; SLURM_CONF=$CONF"
}

# Cancel this cluster's jobs (their processes outlive slurmd otherwise), then stop every daemon by its pid file.
stop_daemons() {
    local name pidfile comm pid pids=() deadline
    local jobs
    jobs=$(live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null && squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086 # one id per word
        scancel --quiet $jobs || true
        # KillWait is 30 s: a job that ignores SIGTERM is killed by then.
        deadline=$((SECONDS + 40))
        while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    fi
    while IFS=: read -r name pidfile comm; do
        pid=$(live_pid "$pidfile" "$comm") || continue
        kill -TERM "$pid" && pids+=("$pid:$comm:$name")
    done < <(daemons)
    # slurmctld saves its state before it exits: about 2.5 s here.
    deadline=$((SECONDS + STOP_TIMEOUT_S))
    local entry left=()
    while :; do
        left=()
        for entry in "${pids[@]}"; do
            IFS=: read -r pid comm name <<<"$entry"
            [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && left+=("$entry")
        done
        ((${#left[@]} == 0)) && break
        if ((SECONDS >= deadline)); then
            for entry in "${left[@]}"; do
                IFS=: read -r pid comm name <<<"$entry"
                echo "slurm_cluster.sh: $name (pid $pid) still runs ${STOP_TIMEOUT_S} s after SIGTERM: SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
            done
            sleep 1
            for entry in "${left[@]}"; do
                IFS=: read -r pid comm name <<<"$entry"
                [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && die "$name (pid $pid) survived SIGKILL"
            done
            break
        fi
        sleep 0.2
    done
}

stop() {
    local t0=$SECONDS s
    s=$(state)
    if [[ $s == stopped ]]; then
        remove_hosts_line
        say "not running"
        return 0
    fi
    ((EUID == 0)) || die "stopping the cluster needs root (its daemons run as root and munge)"
    stop_daemons
    remove_hosts_line
    say "stopped in $((SECONDS - t0)) s"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status)
        s=$(state)
        say "$s (dir: $DIR)"
        [[ $s == running ]]
        ;;
    env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
    *) die "usage: tools/slurm_cluster.sh start|stop|status|env (state in \$DIST_LM_SLURM_DIR, default /tmp/dist_lm_slurm)" ;;
esac
