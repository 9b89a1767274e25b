#!/usr/bin/env bash
# The netpol lab demo: three pods on a Flannel-like node, the reachability matrix
# before and after a default deny with two allow rules, and the drops it caused.
set -euo pipefail
cd "$(dirname "$0")/.."
NETPOL=${NETPOL:-target/release/netpol}
LAB=demo
work=$(mktemp -d)
cleanup() { "$NETPOL" lab down --name "$LAB" || true; rm -rf "$work"; }
trap cleanup EXIT

cp examples/demo/pods.yaml "$work/"
echo "== bringing up lab '$LAB' (one node, three pods, the netpol agent)"
"$NETPOL" lab up --name "$LAB" --manifests "$work"
"$NETPOL" lab status --name "$LAB"

echo
echo "== before any policy: everyone reaches everyone on 8080"
"$NETPOL" lab probe --name "$LAB" --port 8080

echo
echo "== applying examples/demo/policies.yaml (default deny + frontend->api:8080 + api->db:5432)"
cp examples/demo/policies.yaml "$work/"
"$NETPOL" lab wait --name "$LAB"

# Follow drops while probing; stop after a few.
timeout 20 "$NETPOL" observe --lab "$LAB" --verdict dropped --count 4 > "$work/drops.txt" &
observer=$!
"$NETPOL" lab wait --name "$LAB" >/dev/null

echo
echo "== after: only frontend reaches api on 8080 (✗ = dropped by policy, a timeout)"
"$NETPOL" lab probe --name "$LAB" --port 8080
echo
echo "== and only api reaches db on 5432"
"$NETPOL" lab probe --name "$LAB" --port 5432 --to data/db

wait "$observer" || true
echo
echo "== drops as 'netpol observe' shows them"
cat "$work/drops.txt"
echo
echo "== done; tearing the lab down"
