"""Role pvgrub: PV-GRUB 2 images that read menu.lst like EC2's AKIs."""

import pytest


@pytest.mark.parametrize("variant", ["hd0", "hd00"])
def test_pvgrub2_image_is_a_xen_pv_elf(host, variant):
    image = host.file(f"/var/lib/pvlab/pvgrub/pvgrub2-x86_64-{variant}.elf")
    assert image.exists and image.size > 100_000
    assert host.check_output(f"head -c 4 {image.path} | od -An -c").split() == [
        "177", "E", "L", "F"
    ]


def test_hd0_image_embeds_the_menu_lst_lookup(host):
    script = host.file("/var/lib/pvlab/pvgrub/hd0/boot/grub/grub.cfg").content_string
    assert "legacy_configfile" in script and "/boot/grub/menu.lst" in script
