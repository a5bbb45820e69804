"""The real CLI as a subprocess against the IMS emulator and the fake apiserver."""
