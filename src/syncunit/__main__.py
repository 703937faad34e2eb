from syncunit.cli import main

raise SystemExit(main())
