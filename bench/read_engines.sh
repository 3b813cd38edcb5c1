#!/usr/bin/env bash
# What one 4 KiB O_DIRECT random read from a dm-thin volume costs the
# machine, by the way user space submits it: the cost dmsnapd's workers pay
# for every read that the journal's overlay does not answer.
#   tools/vm --timeout 900 -- bench/read_engines.sh [SECONDS]
# Runs as root on a kernel with dm-thin (in the VM). For each fio engine,
# on the thin volume and on its bare loop device: IOPS, the machine's CPU
# busy and CPU per read (busy CPUs x time / reads: every thread and
# interrupt included, so the kernel's workers count too).
set -euo pipefail
secs=${1:-4}
work=$(mktemp -d /tmp/read-engines.XXXXXX)
thin=dmsnap-bench-thin
pool=dmsnap-bench-pool
data='' meta=''
cleanup() {
    dmsetup remove "$thin" 2>/dev/null || true
    dmsetup remove "$pool" 2>/dev/null || true
    [ -n "$data" ] && losetup -d "$data"
    [ -n "$meta" ] && losetup -d "$meta"
    rm -rf "$work"
}
trap cleanup EXIT
truncate -s 512M "$work/data"
truncate -s 32M "$work/meta"
data=$(losetup -f --show "$work/data")
meta=$(losetup -f --show "$work/meta")
dd if=/dev/zero of="$meta" bs=4k count=1 oflag=direct status=none
dmsetup create "$pool" --table "0 $((512 * 2048)) thin-pool $meta $data 128 0"
dmsetup message "$pool" 0 "create_thin 0"
dmsetup create "$thin" --table "0 $((128 * 2048)) thin /dev/mapper/$pool 0"
# provision every block, as the SCSI bench does before it reads
dd if=/dev/urandom of="/dev/mapper/$thin" bs=1M count=128 oflag=direct status=none

busy() { awk '/^cpu /{b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6}' /proc/stat; }
run() {
    local name=$1 dev=$2 b0 t0 b1 t1 iops
    shift 2
    read -r b0 t0 < <(busy)
    iops=$(fio --name=x --filename="$dev" --direct=1 --rw=randread --bs=4k --norandommap \
        --time_based --runtime="$secs" --ramp_time=0.5 --group_reporting --thread "$@" \
        --output-format=terse --terse-version=3 | awk -F';' '{print $8}')
    read -r b1 t1 < <(busy)
    awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) -v i="$iops" -v n="$(nproc)" -v name="$name" \
        'BEGIN { printf "| %s | %d | %.0f%% | %.0f |\n", name, i, 100 * b / t, b / t * n * 1e6 / i }'
}
for dev in "/dev/mapper/$thin" "$data"; do
    echo
    echo "$dev ($(nproc) CPUs, $secs s per engine):"
    echo
    echo "| engine | IOPS | machine busy | CPU µs per read |"
    echo "|---|---|---|---|"
    run "psync, 16 threads at QD1 (dmsnapd's workers)" "$dev" --ioengine=psync --numjobs=16
    run "psync, 1 thread" "$dev" --ioengine=psync --numjobs=1
    run "libaio, QD32" "$dev" --ioengine=libaio --iodepth=32
    run "io_uring, QD32" "$dev" --ioengine=io_uring --iodepth=32
    run "io_uring, QD32, registered buffers and file" "$dev" --ioengine=io_uring --iodepth=32 \
        --fixedbufs --registerfiles
    run "io_uring, QD32, registered, SQ polling thread" "$dev" --ioengine=io_uring --iodepth=32 \
        --fixedbufs --registerfiles --sqthread_poll=1
done
