from hopwatch.cli import main

main()
