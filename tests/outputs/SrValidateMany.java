// PixelMed's DicomSRValidator over several files in one JVM (the validator compiles its XSLT
// rule sets once, which takes most of its run time). Same class and checks as
// shared/tools/sr-validate and `DicomSRValidator FILE`; run with the same -Djdk.xml.* limits lifted:
//   java -Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0 \
//        -cp /usr/share/java/pixelmed.jar SrValidateMany.java FILE...
// Prints "=== FILE" and then the validator's report for each file.
import com.pixelmed.validate.DicomSRValidator;

public class SrValidateMany {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String file : args) {
            System.out.println("=== " + file);
            try {
                System.out.print(validator.validate(file));
            } catch (Exception e) {
                System.out.println("Error: validator failed: " + e);
            }
            System.out.println();
        }
    }
}
