"""Worked examples that ship with syncunit: ``syncunit.examples.hospital``.

In a built package the examples are inside it; in a checkout they live in
``examples/`` at the top (where tests import them as ``hospital``), and this
package finds them there.
"""

from __future__ import annotations

from pathlib import Path

_checkout = Path(__file__).resolve().parents[3] / "examples"
if (_checkout / "hospital" / "__init__.py").is_file() and not (
    Path(__file__).parent / "hospital"
).is_dir():
    __path__.append(str(_checkout))
