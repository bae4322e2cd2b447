from supmae.cli.main import main

raise SystemExit(main())
