#!/usr/bin/env bash
# Vagrant provisioner (runs as root inside the Debian 12 box):
#   provision.sh setup   install everything (tools/setup, without the VM tooling)
#   provision.sh test    run the whole suite natively: the box's kernel has
#                        device-mapper and LIO, so no nested VM.
#   provision.sh bench   the SCSI bench (dmsnap vs LIO iblock) natively, with
#                        $DMSNAP_BENCH_ARGS; on a KVM host with more CPUs
#                        this is the figure the emulated test VM cannot give.
# The braces make bash read the whole script before running any of it, so
# editing this file cannot derail a copy that is already running.
{
set -euo pipefail

repo=/dmsnap
cd "$repo"

# The box runs the kernel tests itself; it needs no QEMU or virtme-ng.
export DMSNAP_SETUP_NO_VM=1
export DMSNAP_VM=never

case ${1:-setup} in
    setup)
        export DEBIAN_FRONTEND=noninteractive
        command -v make >/dev/null || { apt-get update -q; apt-get install -y -q make; }
        tools/setup
        ;;
    test)
        make test
        ;;
    bench)
        mkdir -p bench/results
        make bench-scsi ARGS="${DMSNAP_BENCH_ARGS:-}"
        ;;
    *)
        echo "usage: $0 setup|test|bench" >&2
        exit 2
        ;;
esac
exit
}
