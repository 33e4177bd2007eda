"""``<sound>`` devices on the QEMU command line, as libvirt 9.0's qemuBuildSoundCommandLine:
one ``-audiodev`` (id ``audio1``: ``none`` — the host's sound system is never opened — or
``spice`` when the domain has SPICE graphics, where the audio travels to the client), then per
``<sound model=M>`` the controller (``sound<N>``) and, for the Intel HDA models, its codec
(``sound<N>-codec<K>``: ``hda-duplex`` unless ``<codec type='micro|output'>``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmconfine.domain.xml import child, children
from vmconfine.qemu.argv_devices import UnsupportedConfigError, to_json

if TYPE_CHECKING:
    from vmconfine.qemu.argv_devices import Builder

#: <sound model=...> → QEMU device
SOUND_MODELS = {"ich9": "ich9-intel-hda", "ich6": "intel-hda", "ac97": "AC97",
                "es1370": "ES1370", "sb16": "sb16"}
HDA_MODELS = frozenset({"ich9", "ich6"})
#: <codec type=...> → HDA codec device
CODECS = {"duplex": "hda-duplex", "micro": "hda-micro", "output": "hda-output"}
AUDIO_ID = "audio1"


def add_sound(b: Builder) -> None:
    """The audio backend and every ``<sound>`` device of the domain."""
    devices = child(b.domain.root, "devices")
    sounds = children(devices, "sound") if devices is not None else []
    if not sounds:
        return
    spice = any(g.type == "spice" for g in b.domain.graphics)
    b.add("-audiodev", to_json({"id": AUDIO_ID, "driver": "spice" if spice else "none"}))
    for n, el in enumerate(sounds):
        model = el.get("model")
        if model not in SOUND_MODELS:
            raise UnsupportedConfigError(
                f"sound model '{model}' is not supported; use one of "
                f"{', '.join(SOUND_MODELS)}"
            )
        sid = f"sound{n}"
        props: dict[str, object] = {"driver": SOUND_MODELS[model], "id": sid}
        if model not in HDA_MODELS:
            props["audiodev"] = AUDIO_ID
        b.device(props)
        if model not in HDA_MODELS:
            continue
        codecs = [c.get("type") or "duplex" for c in children(el, "codec")] or ["duplex"]
        for k, codec in enumerate(codecs):
            if codec not in CODECS:
                raise UnsupportedConfigError(
                    f"sound codec type '{codec}' is not supported; use duplex, micro or output")
            b.device({"driver": CODECS[codec], "id": f"{sid}-codec{k}", "bus": f"{sid}.0",
                      "cad": k, "audiodev": AUDIO_ID})
