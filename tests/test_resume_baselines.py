"""Ablating Concepts and Forget-Me-Not killed (SIGKILL at a known step) and resumed give the delta of the run that was
never killed, byte for byte (issue 21). Their data preparation (anchor and reference images from the base model) is
cut to a few images of a few DDIM steps, so that each case stays well under a minute."""
import pytest

from tests.test_resume import _kill_resume_compare

SMALL = {
    "ablating": ["method=ablating", "method.num_anchor_images=4", "method.anchor_steps=4"],
    "fmn": ["method=fmn", "method.num_reference_images=2", "method.reference_steps=4"],
}


@pytest.mark.parametrize("method", sorted(SMALL))
def test_kill_and_resume_is_bit_identical(tmp_path, method):
    _kill_resume_compare(tmp_path, SMALL[method])
