"""``python -m protheus_broker.demo``: the demo (see :mod:`protheus_broker.demo.run`)."""

from protheus_broker.demo.run import main

main()
