from fetchd.cli import main

raise SystemExit(main())
