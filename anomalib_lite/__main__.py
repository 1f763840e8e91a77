from anomalib_lite.cli import main

main()
