"""pvlab: boot and debug EC2 PV images locally under Xen, PV-GRUB and a fake IMDS."""

__version__ = "0.1.0"
