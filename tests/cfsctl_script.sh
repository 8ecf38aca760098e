#!/bin/bash
# A script written against cfsctl's output formats (composefs-rs crates/composefs-ctl),
# run against trio-cfsctl by tests/test_cfsctl_script.py.
# Usage: CFSCTL="cfsctl" cfsctl_script.sh REPO OCI-LAYOUT-REFERENCE LAYER.tar DIFF_ID
# (Outputs are captured before grep -q reads them: with pipefail, a reader that stops
# early would fail the writer with SIGPIPE, ours and cfsctl's alike.)
set -euo pipefail
REPO=$1 SOURCE=$2 TAR=$3 DIFF=$4
cfs() { $CFSCTL --repo "$REPO" "$@"; }
json() { python3 -c "import json, sys; d = json.load(sys.stdin); assert $1, d"; }
step() { echo "== $*" >&2; }

step init
cfs init --insecure >/dev/null

step "import-layer prints the stream's object id, algorithm-prefixed"
id=$(cfs oci import-layer "$DIFF" base <"$TAR" 2>/dev/null)
[[ $id =~ ^sha(256|512):[0-9a-f]+$ ]]

step "pull prints manifest, config, verity, tagged and objects lines on stdout"
out=$(cfs oci pull "$SOURCE" demo 2>/dev/null)
manifest=$(awk '$1 == "manifest" {print $2}' <<<"$out")
[[ $manifest =~ ^sha256:[0-9a-f]{64}$ ]]
[[ $(awk '$1 == "config" {print $2}' <<<"$out") =~ ^sha256:[0-9a-f]{64}$ ]]
[[ $(awk '$1 == "verity" {print $2}' <<<"$out") =~ ^[0-9a-f]+$ ]]
grep -qx 'tagged   demo' <<<"$out"
grep -Eq '^objects  [0-9]+ new \+ [0-9]+ already present objects; .* stored, .* inlined$' <<<"$out"

step "images --no-trunc shows the whole digest"
images=$(cfs oci images --no-trunc)
grep -q "${manifest#sha256:}" <<<"$images"
cfs oci images --json | json 'd["images"][0]["manifest_digest"] == "'"$manifest"'"'

step "oci layer: raw tar, --dumpfile, --json"
[[ $(cfs oci layer "$DIFF" | sha256sum | cut -d' ' -f1) == "${DIFF#sha256:}" ]]
dump=$(cfs oci layer "$DIFF" --dumpfile)
grep -Eq '^/[^ ]* [0-9]+ [0-7]+ 1 ' <<<"$dump"
cfs oci layer "$DIFF" --json | json 'd["diffId"] == "'"$DIFF"'" and d["entryCount"] > 0 and d["size"] > 0 and set(d["splitstream"]) == {"externalObjects", "externalSize", "inlineSize"}'
if cfs oci layer 1234 >/dev/null 2>&1; then exit 1; fi

step "cat a ref"
[[ $(cfs cat refs/base | sha256sum | cut -d' ' -f1) == "${DIFF#sha256:}" ]]

step "fsck: plain ends with status: ok; --json is FsckReply"
[[ $(cfs fsck 2>/dev/null | tail -1) == "status: ok" ]]
cfs fsck --json 2>/dev/null | json 'd["ok"] is True and d["has_metadata"] and d["objects_checked"] > 0 and d["errors"] == [] and all(k in d for k in ("objects_corrupted", "streams_checked", "streams_corrupted", "images_checked", "images_corrupted", "broken_links", "missing_objects"))'
cfs oci fsck demo --json 2>/dev/null | json 'd["ok"] is True and d["images_checked"] == 1 and d["images_corrupted"] == 0 and d["repo"]["ok"] is True'
cfs oci fsck --json 2>/dev/null | json 'd["images_checked"] == 1'

step "gc -n / --dry-run and -r"
out=$(cfs gc -n)
[[ ${out%%$'\n'*} == "Dry run (no files deleted):" ]]
out=$(cfs gc --dry-run)
grep -Eq '^Objects: [0-9]+ removed \([0-9]+ bytes\)$' <<<"$out"
out=$(cfs gc -r "oci-layer-$DIFF")
grep -Eq '^Objects: [0-9]+ removed \([0-9]+ bytes\)$' <<<"$out"

step "damage: fsck --json still exits 0 with ok false, plain fsck exits 1"
victim=$(find "$REPO/objects" -type f -size +100k -print -quit)
chmod u+w "$victim"
printf 'X' | dd of="$victim" bs=1 seek=10 conv=notrunc status=none
cfs fsck --json 2>/dev/null | json 'd["ok"] is False and d["objects_corrupted"] == 1 and d["errors"][0].startswith("fsck: object-digest-mismatch: objects/")'
if cfs fsck >/dev/null 2>&1; then exit 1; fi
cfs oci fsck demo --json 2>/dev/null | json 'd["ok"] is False and d["images_corrupted"] == 1 and d["errors"]'
echo "all cfsctl-format checks passed" >&2
