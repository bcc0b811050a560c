"""``python -m protheus_broker.demo.twistd ...``: twistd, as a module (the demo's NODE_COMMAND runs
the sample AppServer with it: an ini value cannot hold ``python -c "...; ..."``, ';' starts a
comment)."""

from twisted.scripts.twistd import run

if __name__ == "__main__":
    run()
