# Sourced by the launch scripts: the repository root and the Python that has epruntime installed.
#   PYTHON  interpreter to run (default: the repository's .venv made by `make install`, else python3)
# shellcheck shell=bash
EPRUNTIME_ROOT=${EPRUNTIME_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $EPRUNTIME_ROOT/.venv/bin/python ]] && PYTHON=$EPRUNTIME_ROOT/.venv/bin/python
fi
export EPRUNTIME_ROOT PYTHON
