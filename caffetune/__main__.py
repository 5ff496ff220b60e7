from caffetune.cli import main

main()
