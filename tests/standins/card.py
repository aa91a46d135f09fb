#!/usr/bin/python3
"""A smartcard for the agent's card tests: python3-virtualsmartcard's VirtualICC (the engine behind
`vicc`) connected to vpcd, pcscd's virtual reader, on the port given. Inserting the card is starting
this program; removing it is stopping it (vpcd then reports the reader empty).

The card answers the GlobalPlatform GET DATA for the Card Production Life Cycle data
(80 CA 9F 7F 00) with a CPLC whose IC serial number is SERIAL, as the Java Card / GlobalPlatform cards
that NHS smartcards are do; everything else gets 6D00 (instruction not supported).

Usage: card.py PORT SERIAL_HEX
"""
import sys

# Debian's python3-pycryptodome is the `Cryptodome` package; virtualsmartcard imports `Crypto`.
import Cryptodome

sys.modules["Crypto"] = Cryptodome
# Debian's python3-virtualsmartcard installs outside the default module path.
sys.path.insert(0, "/usr/lib/python3/site-packages/virtualsmartcard")

import logging  # noqa: E402

from virtualsmartcard.VirtualSmartcard import SmartcardOS, VirtualICC  # noqa: E402

ATR = bytes.fromhex("3BDC18FF8191FE1FC38073C821136605036351000250")


class CplcCard(SmartcardOS):
    def __init__(self, serial):
        self.serial = serial

    def getATR(self):
        return ATR

    def execute(self, msg):
        if msg[:4] == bytes.fromhex("80CA9F7F"):
            # CPLC: tag 9F7F, 42 bytes; IC serial number at offset 12 (4 bytes), batch id after it.
            body = bytearray(42)
            body[0:2] = bytes.fromhex("4790")  # IC fabricator
            body[12:16] = self.serial[:4].rjust(4, b"\0")
            body[16:18] = self.serial[4:6].rjust(2, b"\0")
            return bytes.fromhex("9F7F2A") + bytes(body) + bytes.fromhex("9000")
        return bytes.fromhex("6D00")


def main():
    port = int(sys.argv[1])
    serial = bytes.fromhex(sys.argv[2])
    icc = VirtualICC(None, "iso7816", "localhost", port, logginglevel=logging.WARNING)
    icc.os = CplcCard(serial)
    print("inserted", flush=True)
    icc.run()


if __name__ == "__main__":
    main()
