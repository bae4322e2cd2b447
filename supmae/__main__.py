from supmae.cli import main

raise SystemExit(main())
