from mlx_ltc.cli import main

main()
