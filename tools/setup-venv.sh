#!/usr/bin/env bash
# Create .venv beside the project and install it (editable) with the given extras.
# Re-runs are cheap: pip runs again only when pyproject.toml or the extras change.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $($py --version)…" >&2
    "$py" -m venv .venv
fi
stamp=".venv/.deltatalk-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)${extras:+[$extras]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "Installing deltatalk${extras:+ [$extras]} and its dependencies…" >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}" >&2
    echo "$want" > "$stamp"
fi
