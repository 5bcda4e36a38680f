from warmstart.entry import main

main()
