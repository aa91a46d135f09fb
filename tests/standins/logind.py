#!/usr/bin/python3
"""A stand-in for systemd-logind on a private D-Bus, for the agent's workstation-lock tests.

It owns org.freedesktop.login1, answers Manager.GetSessionByPID with one session path, and emits that
session's Lock and Unlock signals when told to through test.Control (EmitLock / EmitUnlock). The agent's
code path is the one that listens to the real logind: only the bus address differs.
Prints "ready" on stdout once the name is owned. Needs Debian python3-dbus and python3-gi.
"""
import sys

import dbus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

SESSION = "/org/freedesktop/login1/session/_31"


class Manager(dbus.service.Object):
    @dbus.service.method("org.freedesktop.login1.Manager", in_signature="u", out_signature="o")
    def GetSessionByPID(self, pid):
        return dbus.ObjectPath(SESSION)


class Session(dbus.service.Object):
    @dbus.service.signal("org.freedesktop.login1.Session")
    def Lock(self):
        pass

    @dbus.service.signal("org.freedesktop.login1.Session")
    def Unlock(self):
        pass

    @dbus.service.method("test.Control")
    def EmitLock(self):
        self.Lock()

    @dbus.service.method("test.Control")
    def EmitUnlock(self):
        self.Unlock()


def main():
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(sys.argv[1])
    name = dbus.service.BusName("org.freedesktop.login1", bus)
    Manager(bus, "/org/freedesktop/login1")
    Session(bus, SESSION)
    print("ready", flush=True)
    GLib.MainLoop().run()
    del name


if __name__ == "__main__":
    main()
