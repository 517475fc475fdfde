"""`kdforge.extras.require`: an installed module is returned, a missing one fails in one line naming the extra."""

import pytest

from kdforge.errors import KdforgeError
from kdforge.extras import require


def test_require_returns_the_module():
    import json

    assert require("json", "none") is json


def test_missing_module_names_the_extra_and_the_pip_command():
    with pytest.raises(KdforgeError) as err:
        require("kdforge_no_such_module.sub", "generative", "SDD's diffusion model")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("SDD's diffusion model")
    assert "`generative` extra" in msg and "pip install 'kdforge[generative]'" in msg
