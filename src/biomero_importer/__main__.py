from biomero_importer.cli.app import main

main()
