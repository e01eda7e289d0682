require "vacation";
vacation :days "x" "y";
