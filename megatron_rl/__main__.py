from megatron_rl.cli.main import main

raise SystemExit(main())
