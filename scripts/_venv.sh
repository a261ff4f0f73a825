# Sourced by scripts/test and scripts/quickstart: make ./.venv on a fresh machine (Python >= 3.11)
# and install sluice into it with the given extras. Re-running is cheap: pip skips what is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

find_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: sluice needs Python >= 3.11; none found (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

ensure_venv() {  # ensure_venv EXTRAS   e.g. ensure_venv "dev"
    local extras="$1"
    if [ ! -x .venv/bin/python ]; then
        local py
        py="$(find_python)"
        echo "--> creating .venv with $py" >&2
        "$py" -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    local stamp=".venv/.sluice-installed-$extras"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "--> installing sluice[$extras] into .venv" >&2
        .venv/bin/python -m pip install -q -e ".[$extras]"
        touch "$stamp"
    fi
    export PATH="$ROOT/.venv/bin:$PATH"
}
