from pathlib import Path

import pytest

from pvlab import xlconfig
from pvlab.errors import DomainError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "aws-test.conf"


def test_hand_written_recipe_config_is_read():
    config = xlconfig.parse(FIXTURE)
    assert config.name == "aws-test"
    assert config.kernel.endswith("pv-grub-x86_64.gz")
    assert (config.memory, config.vcpus) == (1024, 1)
    assert config.mac == "00:16:3e:58:88:57"
    assert config.disk == ("/home/vagrant/boot-vol.img", "sda1")


def test_lists_over_several_lines_and_keyed_disks_are_read(tmp_path):
    path = tmp_path / "g.cfg"
    path.write_text(
        'name = "g#1"  # a comment\n'
        "disk = [\n  'vdev=xvda1, format=raw, target=/img/v.img',\n]\n"
        "vif = [ 'mac=00:16:3e:00:00:01,bridge=xenbr0' ]\n"
    )
    config = xlconfig.parse(path)
    assert config.name == "g#1"
    assert config.disk == ("/img/v.img", "xvda1")
    assert config.mac == "00:16:3e:00:00:01"


@pytest.mark.parametrize("text, message", [
    ("name aws-test\n", ":1: not a `key = value` line"),
    ("memory = lots\n", ":1: cannot read the value of memory"),
    ('name = "x"\n', "names no disk"),
])
def test_broken_configs_name_the_line_or_the_missing_part(tmp_path, text, message):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(DomainError, match=message):
        _ = xlconfig.parse(path).disk
