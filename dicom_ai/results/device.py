"""Who made a result: this node, as written into General / Enhanced General Equipment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import dicom_ai

__all__ = ["DeviceIdentity", "Equipment"]


class Equipment(TypedDict):
    """highdicom's keyword arguments for the device that made a dataset."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


@dataclass(frozen=True)
class DeviceIdentity:
    """The node as a DICOM device: Manufacturer, Manufacturer's Model Name, Software
    Versions and Device Serial Number (the node id)."""

    manufacturer: str
    model_name: str
    software_version: str
    device_serial_number: str

    @classmethod
    def for_node(cls, node_id: str) -> DeviceIdentity:
        """This software, installed as node ``node_id``."""
        return cls(
            manufacturer="dicom-ai",
            model_name="dicom-ai",
            software_version=dicom_ai.__version__,
            device_serial_number=node_id,
        )

    def equipment(self) -> Equipment:
        """The device as highdicom's constructors (SEG, SR, SC, Parametric Map) take it."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.model_name,
            "software_versions": self.software_version,
            "device_serial_number": self.device_serial_number,
        }
