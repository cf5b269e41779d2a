from firewall.cli import main

raise SystemExit(main())
