# Shared by scripts/demo, scripts/test and the benchmark scripts: find Python >= 3.12 and keep
# the project's virtual environment (.venv) installed and current. Source it; do not run it.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAILMERGE_GOV_VENV:-$REPO/.venv}"

say() { printf '%s\n' "$*" >&2; }

# A candidate is usable when it runs, is 3.12 or newer and can make a venv with pip.
# pyenv shims (python3.12 …) exist but fail when no pyenv version is selected, so each
# candidate is asked for its own version instead of being trusted by its name.
python_ok() {
  "$1" - <<'PY' >/dev/null 2>&1
import sys
if sys.version_info < (3, 12):
    sys.exit(1)
import ensurepip, venv  # noqa: F401  Debian splits these into python3.X-venv
PY
}

find_python() {
  local candidate
  local -a candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  candidates+=(python3.14 python3.13 python3.12 python3 python)
  if command -v pyenv >/dev/null 2>&1; then
    local root
    root="$(pyenv root 2>/dev/null)"
    for candidate in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -Vr); do
      candidates+=("$candidate/bin/python3")
    done
  fi
  for candidate in /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$candidate" ] && candidates+=("$candidate")
  done
  for candidate in "${candidates[@]}"; do
    if python_ok "$candidate"; then
      command -v "$candidate" 2>/dev/null || echo "$candidate"
      return 0
    fi
  done
  say "mailmerge-gov needs Python 3.12 or newer with the venv module, and none was found."
  say "Tried: ${candidates[*]}"
  say "On Debian 13 or Ubuntu 24.04: sudo apt-get install python3 python3-venv"
  say "On Debian 12: install Python 3.12 (e.g. with pyenv: pyenv install 3.12) and run again,"
  say "or point PYTHON at it: PYTHON=/path/to/python3.12 $0"
  return 1
}

# Create .venv when missing or broken, and (re)install the package when its metadata changed.
ensure_venv() {
  local extras="$1" stamp want
  if [ ! -x "$VENV/bin/python" ] || ! python_ok "$VENV/bin/python"; then
    local python
    python="$(find_python)" || exit 1
    say "==> creating the virtual environment $VENV with $python"
    rm -rf "$VENV"
    "$python" -m venv "$VENV"
  fi
  stamp="$VENV/.mailmerge-gov-installed"
  want="$extras $(cat "$REPO/setup.cfg" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "==> installing mailmerge-gov${extras:+[$extras]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO${extras:+[$extras]}"
    echo "$want" > "$stamp"
  fi
}
