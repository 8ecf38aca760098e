"""composefs images from directory trees, and the image commands of the library."""
