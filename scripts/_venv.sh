# Sourced by scripts/test and scripts/quickstart: make ./.venv on a fresh machine (Python >= 3.11)
# and install sluice into it (with the given extras, e.g. dev; none: the base package only).
# Re-running is cheap: a stamp file per extras says what is installed.
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

ensure_venv() {  # ensure_venv [EXTRAS]   e.g. ensure_venv dev; no argument: the base package
    local extras="${1:-}"
    if [ ! -x .venv/bin/python ]; then
        local py
        py="$(find_python)"
        echo "--> creating .venv with $py" >&2
        "$py" -m venv .venv
        echo "--> upgrading pip in .venv" >&2
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    local stamp=".venv/.sluice-installed-${extras:-base}"
    local spec=".${extras:+[$extras]}"
    if [ -z "$extras" ]; then  # any install of sluice includes the base package
        local other
        for other in .venv/.sluice-installed-*; do
            if [ -f "$other" ] && [ ! pyproject.toml -nt "$other" ]; then stamp="$other"; fi
        done
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "--> installing sluice ($spec, editable) into .venv; pip's progress follows" >&2
        # pip's output goes to stderr with these lines, leaving stdout to the command's own.
        # The filter hides setuptools' notice about editable installs (an information banner,
        # not a problem); it reaches the isolated build through the environment.
        PYTHONWARNINGS="ignore:Editable installation" \
            .venv/bin/python -m pip install --disable-pip-version-check -e "$spec" >&2
        touch "$stamp"
    fi
    export PATH="$ROOT/.venv/bin:$PATH"
}
