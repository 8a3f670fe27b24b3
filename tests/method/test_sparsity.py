import pytest

from se_export.errors import SEError
from se_export.method.sparsity import parse_sparsity


@pytest.mark.parametrize(("text", "fraction", "structured"), [
    ("0.5", 0.5, False), ("70%", 0.7, False), ("0", 0.0, False), ("2:4", 0.5, True), ("1:4", 0.75, True),
])
def test_valid_specs(text, fraction, structured):
    spec = parse_sparsity(text)
    assert spec.fraction == pytest.approx(fraction)
    assert spec.structured == structured


def test_nm_counts_follow_nvidia_convention():
    spec = parse_sparsity("1:4")
    assert (spec.keep_n, spec.group_m, spec.prune_n) == (1, 4, 3)
    assert str(spec) == "1:4"


@pytest.mark.parametrize("text", ["abc", "1.5", "-0.1", "4:2", "0:4", "2:", "50%%"])
def test_bad_specs_name_the_accepted_forms(text):
    with pytest.raises(SEError, match="bad sparsity"):
        parse_sparsity(text)
