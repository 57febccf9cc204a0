from qbo_daemon.cli import main

raise SystemExit(main())
