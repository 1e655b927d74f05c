#!/usr/bin/env bash
# A real single-node SLURM on this machine, for `pytest -m slurm` (tests/test_slurm_real.py) and for trying
# hydra/launcher=slurm by hand (docs/slurm.md):
#
#   bash scripts/slurm_local.sh up       install what is missing, start everything, wait until it answers
#   bash scripts/slurm_local.sh status   exit 0 if it is up (and say what runs), 1 if not
#   bash scripts/slurm_local.sh down     cancel its jobs, stop every daemon it started (by PID), keep its state
#   bash scripts/slurm_local.sh purge    down, then delete the state folder
#
# Needs: root, and Debian/Ubuntu apt (it installs slurmctld slurmd slurmdbd slurm-client munge mariadb-server
# when one is missing; nothing else from outside the repository). No systemd is needed: the daemons are
# started directly, each writing its PID file into the state folder, and `down` stops those PIDs only.
#
# Everything it writes lives in the state folder, $SMT_SLURM_STATE (default /tmp/smt-bench-slurm): the
# configs (slurm.conf, slurmdbd.conf), the munge key and socket, the MariaDB data folder, spool, logs
# (log/*.log) and PID files (run/*.pid). Clients find the cluster through SLURM_CONF=<state>/slurm.conf;
# `up` also links /etc/slurm/slurm.conf to it when that path is free (so plain `sinfo` works), and `down`
# removes that link again. Ports (env to change): slurmctld 6817, slurmd 6818, slurmdbd 6819, MariaDB 3307
# on 127.0.0.1 only.
#
# The cluster: one node, `localhost`, with this machine's CPUs and memory (slurmd -C), one partition
# ($SMT_SLURM_PARTITION, default `local`), consumable cores (jobs share the node by --cpus-per-task; memory
# is checked against the node but not reserved). The settings smt-bench's preemption path relies on:
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none  no cgroups needed (containers, VMs)
#   JobRequeue=1                                           jobs may be requeued (scontrol requeue)
#   AuthInfo=cred_expire=30                                a requeued job may start again after ~30 s
#                                                          (SLURM's default is 120 s)
#   KillWait=10                                            SIGTERM -> SIGKILL after 10 s (time limit, scancel,
#                                                          scontrol requeue)
#   AccountingStorageType=accounting_storage/slurmdbd     submitit asks `sacct` for job states
#   (AccountingStoragePass=<munge socket>: how clients such as sacct reach this cluster's own munged)
#   SchedulerParameters=sched_interval=5,bf_interval=5     requeued/pending jobs are picked up within seconds
set -euo pipefail

STATE=${SMT_SLURM_STATE:-/tmp/smt-bench-slurm}
CLUSTER=${SMT_SLURM_CLUSTER:-smtbench}
PARTITION=${SMT_SLURM_PARTITION:-local}
CTLD_PORT=${SMT_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SMT_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${SMT_SLURM_DBD_PORT:-6819}
DB_PORT=${SMT_SLURM_DB_PORT:-3307}
PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stopped in reverse
export SLURM_CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket.2
DB_SOCKET=$STATE/mysql.sock

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- PIDs ----------------------------------------------------------------------------------------------
pidfile() { echo "$STATE/run/$1.pid"; }
# the PID of a daemon this script started, if it still runs (the PID file's process, with the right name)
alive_pid() {
  local f pid comm
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$1" ] || return 1  # a reused PID is not ours
  echo "$pid"
}
stop_daemon() {
  local name=$1 pid i t0
  t0=$(now)
  pid=$(alive_pid "$name") || { rm -f "$(pidfile "$name")"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do  # 20 s
    [ -d "/proc/$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ]; then
    log "$name ($pid) did not stop on SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pidfile "$name")"
  log "stopped $name ($pid) in $(since "$t0") s"
}
wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local limit=$1 what=$2 start
  shift 2
  start=$(date +%s)
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) - start < limit )) || die "$what did not come up within ${limit}s (logs: $STATE/log/)"
    sleep 0.5
  done
}

# --- install -------------------------------------------------------------------------------------------
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "not root: cannot install ${missing[*]} (apt-get install -y ${missing[*]})"
  command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} yourself"
  log "installing ${missing[*]}"
  # keep the packages' init scripts from starting system-wide daemons during the install
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && ours=1
  fi
  local rc=0
  { apt-get install -y --no-install-recommends "${missing[@]}" >"$STATE/log/apt.log" 2>&1 \
    || { apt-get update >>"$STATE/log/apt.log" 2>&1 \
         && apt-get install -y --no-install-recommends "${missing[@]}" >>"$STATE/log/apt.log" 2>&1; }; } || rc=$?
  [ $ours = 1 ] && rm -f "$policy"
  [ $rc = 0 ] || die "apt-get install failed (see $STATE/log/apt.log)"
}

# --- configs (written once; `purge` to start over) -----------------------------------------------------
write_configs() {
  mkdir -p "$STATE"/{run,log,ctld,spool,munge,mysql}
  chmod 711 "$STATE/munge"
  if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
  if [ ! -s "$SLURM_CONF" ]; then
    local node
    # this machine's CPUs, sockets, cores, threads and memory, as slurmd sees them
    node=$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+ //; s/ *UpTime=.*//')
    [ -n "$node" ] || die "slurmd -C printed nothing"
    cat >"$SLURM_CONF" <<EOF
# written by scripts/slurm_local.sh (delete the state folder, or \`purge\`, to regenerate)
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=30,socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
KillWait=10
MinJobAge=300
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  fi
  if [ ! -s "$STATE/slurmdbd.conf" ]; then
    cat >"$STATE/slurmdbd.conf" <<EOF
# written by scripts/slurm_local.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$(pidfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/slurmdbd.conf"  # slurmdbd refuses a config others can read
  fi
}

link_conf() {  # plain `sinfo` (no SLURM_CONF) finds this cluster, unless /etc/slurm/slurm.conf is someone else's
  local etc=/etc/slurm/slurm.conf
  if [ -L "$etc" ] && [ "$(readlink "$etc")" = "$SLURM_CONF" ]; then return 0; fi
  if [ ! -e "$etc" ] && [ ! -L "$etc" ] && [ -w /etc ]; then
    mkdir -p /etc/slurm && ln -s "$SLURM_CONF" "$etc" && echo "$etc" >"$STATE/run/etc-link"
  else
    log "note: $etc exists and is not this cluster's; use: export SLURM_CONF=$SLURM_CONF"
  fi
}
unlink_conf() {
  local etc=/etc/slurm/slurm.conf
  if [ -f "$STATE/run/etc-link" ] && [ -L "$etc" ] && [ "$(readlink "$etc")" = "$SLURM_CONF" ]; then
    rm -f "$etc" "$STATE/run/etc-link"
  fi
}

# --- daemons -------------------------------------------------------------------------------------------
db() { mariadb --no-defaults --protocol=socket -S "$DB_SOCKET" -u root "$@"; }

start_munged() {
  alive_pid munged >/dev/null && return 0
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$(pidfile munged)" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" --num-threads=10
  wait_for 20 munged bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
}

start_mariadbd() {
  if ! alive_pid mariadbd >/dev/null; then
    if [ ! -d "$STATE/mysql/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed ($STATE/log/mariadb-install.log)"
    fi
    # mariadbd stays in the foreground: detach it; it writes its own PID file
    setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" --port="$DB_PORT" \
      --bind-address=127.0.0.1 --pid-file="$(pidfile mariadbd)" --log-error="$STATE/log/mariadb.log" \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --max-connections=50 \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd db -e "SELECT 1"
    wait_for 10 "mariadbd pid file" alive_pid mariadbd
  fi
  db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
         CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
  alive_pid slurmdbd >/dev/null || slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurmctld() {
  alive_pid slurmctld >/dev/null || slurmctld
  wait_for 60 slurmctld scontrol ping
}

start_slurmd() {
  alive_pid slurmd >/dev/null || slurmd -N localhost
  wait_for 60 "node localhost idle" bash -c "sinfo -h -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

is_up() {
  local d
  for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null || return 1; done
  sinfo -h -n localhost -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)' || return 1
  sacct -n -X -S now-1minutes >/dev/null 2>&1 || return 1
}

cmd_up() {
  local t0 d
  t0=$(now)
  [ "$(id -u)" = 0 ] || die "run as root (the daemons run as root, jobs too)"
  mkdir -p "$STATE"/{run,log}
  if is_up; then
    log "already up ($(since "$t0") s); SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  install_packages
  local t1
  t1=$(now)
  write_configs
  link_conf
  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurmctld
  start_slurmd
  # a node left down or drained by an earlier run: back to service
  if sinfo -h -n localhost -o %T | grep -Eq 'down|drain'; then
    scontrol update nodename=localhost state=resume
  fi
  wait_for 30 sacct sacct -n -X -S now-1minutes
  is_up || die "not up after start (logs: $STATE/log/)"
  log "up in $(since "$t0") s (daemons: $(since "$t1") s); partition '$PARTITION', node:" \
      "$(sinfo -h -n localhost -o '%n %c CPUs %m MB %T')"
  echo "export SLURM_CONF=$SLURM_CONF"
}

cmd_down() {
  local t0 jobs d
  t0=$(now)
  if alive_pid slurmctld >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  for d in slurmd slurmctld slurmdbd mariadbd munged; do stop_daemon "$d"; done
  unlink_conf
  log "down in $(since "$t0") s (state kept in $STATE)"
}

cmd_status() {
  local d pid up=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(alive_pid "$d"); then echo "$d: running ($pid)"; else echo "$d: not running"; up=1; fi
  done
  if [ $up = 0 ] && is_up; then
    echo "up: $(sinfo -h -n localhost -o '%P %n %c CPUs %m MB %T'); SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  echo "not up (state folder: $STATE)"
  return 1
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  purge) cmd_down; rm -rf "$STATE"; log "removed $STATE" ;;
  *) echo "usage: $0 up|down|status|purge   (state: \$SMT_SLURM_STATE, default /tmp/smt-bench-slurm)" >&2; exit 2 ;;
esac
