require "nonesuch";
