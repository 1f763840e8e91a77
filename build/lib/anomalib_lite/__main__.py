from anomalib_lite.train import main

main()
