#!/usr/bin/env bash
# Kalico-style parse-time helper of the kflash rig stand-in tree (rig code).
# Like Kalico's script it regenerates src/extras/Kconfig and src/extras/Makefile
# inside the source tree on every make run (both git-ignored), via a .tmp file,
# so concurrent make runs in one Kalico tree can race just as they do upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p src/extras
rm -f src/extras/Kconfig.tmp
for d in src/extras/*/; do
    [ -e "$d/Kconfig" ] && echo "source \"$d/Kconfig\"" >> src/extras/Kconfig.tmp
done
echo "# extras" >> src/extras/Kconfig.tmp
mv src/extras/Kconfig.tmp src/extras/Kconfig
echo "# extras makefile" > src/extras/Makefile
