from imagetool.cli import main

raise SystemExit(main())
