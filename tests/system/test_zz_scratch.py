import time
from tests.system.test_agent_service import bed, agent, Bed, SERVICE  # noqa: F401

def test_probe(agent: Bed) -> None:
    c = agent.c
    agent.start_agent()
    run_id = agent.run("sleeper", seconds=20)
    time.sleep(12)
    print(c.exec(["ps", "-eo", "pid,ppid,user,stat,args", "--forest"]).stdout[-6000:])
    out = c.exec(["sh", "-c", "for p in $(pgrep -f 'runner-agent-run|prefect.engine|systemd-cat|systemd-run'); do echo == $p $(tr '\\0' ' ' </proc/$p/cmdline | cut -c1-100); ls -l /proc/$p/fd; done"], check=False).stdout
    print(out)
    mp = agent.service("MainPID")["MainPID"]
    print(c.exec(["ls", "-l", f"/proc/{mp}/fd"]).stdout)
    print(agent.api.state(run_id))
    assert False
