import kmec

lm = kmec.load_model("smollm2-135m")
e = kmec.edit(lm, kmec.Fact("The {subject} is located in the city of", "Rome", "Eiffel Tower"))
print("edited:", e.generate("The Eiffel Tower is located in the city of", max_new_tokens=4))
e.revert()
print("reverted:", e.generate("The Eiffel Tower is located in the city of", max_new_tokens=4))
