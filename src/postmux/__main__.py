from postmux.cli import main

main()
