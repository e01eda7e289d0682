require "vacation"; vacation :addresses "bad" "x";
