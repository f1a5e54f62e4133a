"""A section with NaN/inf pixels is refused by name, never taken for a blank section."""

from __future__ import annotations

import numpy as np
import pytest

from emcore.errors import BlankSectionError, NonFiniteSectionError
from emcore.normalize import require_finite, section_stats


def test_all_nan_section_is_refused_naming_it() -> None:
    image = np.full((64, 64), np.nan, np.float32)
    with pytest.raises(NonFiniteSectionError, match=r"section 3: 4096 NaN and 0 inf pixels") as err:
        section_stats(image, section=3)
    assert not isinstance(err.value, BlankSectionError) and err.value.section == 3


def test_a_few_inf_pixels_are_refused_too() -> None:
    image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    image[0, :3] = np.inf
    with pytest.raises(NonFiniteSectionError, match="0 NaN and 3 inf"):
        section_stats(image, section="z7")
    require_finite(np.zeros((4, 4), np.uint8))  # integer data is always finite
