from pocketfed.cli import main

main()
