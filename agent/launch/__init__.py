"""How a flow run's process is started and stopped.

- `base`: the `Launcher` protocol, the launch request and handle, checks shared by launchers;
- `wrapper`: the exit-status wrapper around the engine and the one privilege-drop argv;
- `process`: the process launcher (hosts without systemd);
- `systemd`: the systemd launcher (a transient scope per run);
- `auto`: the `auto | systemd | process` choice.

This file imports nothing, so that importing one launcher never loads the others.
"""
