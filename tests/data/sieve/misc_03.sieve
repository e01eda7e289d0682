require "vacation"; vacation :from "Me <me@x.example>" :subject "S" "x";
